"""Federated rounds end to end with real worker processes."""

from __future__ import annotations

import re
import threading
import time

import pytest
from harness import start_coordinator, start_worker, wait_busy, wait_workers

from rewardsignal import SignalClient
from rewardsignal.data import sample_examples

pytestmark = pytest.mark.slow


class Cluster:
    def __init__(self, tmp_path, n_workers=2, *coord_args):
        self.coord, self.url = start_coordinator(tmp_path / "data", *coord_args)
        self.workers = [start_worker(self.url, f"w{i}") for i in range(n_workers)]
        self.client = SignalClient(base_url=self.url)
        wait_workers(self.url, n_workers)

    def close(self):
        self.client.close()
        for w in self.workers:
            w.stop()
        self.coord.stop()


def test_federated_job_lowers_held_out_loss(tmp_path):
    c = Cluster(tmp_path)
    try:
        ex = sample_examples()
        dataset = tmp_path / "train.jsonl"
        import json

        dataset.write_text("".join(json.dumps(e) + "\n" for e in ex[:200]))
        run = c.client.create_run(base_model="signal-tiny", lora_r=16, learning_rate=2e-3)
        job = run.train_federated(dataset, eval_dataset=ex[200:], rounds=6, local_steps=8,
                                  batch_size=8, outer_optimizer="nesterov", tasks_per_round=2,
                                  codec="int8", round_timeout_s=120)
        st = job.wait(timeout=300, progress=False)
        assert st["status"] == "done", st["reason"]
        assert st["round"] == 6 and st["version"] == 6 and run.info()["version"] == 6
        evals = st["eval_loss_history"]
        assert st["eval_loss"] == evals[-1]  # the latest number; the history beside it
        assert len(evals) == 7  # before training, then after every round
        assert evals[-1] < 0.6 * evals[0], evals
        assert st["accepted"] == 12 and st["rejected"] == {}
        metrics = c.client._loop.run(c.client._target._http("GET", "/metrics", raw=True))
        assert 'signal_bytes_received_total{codec="int8",kind="delta"}' in metrics.decode()
        # A federated run exports its train loss (the last round's) like a stepped one.
        exported = re.search(rf'signal_train_loss{{run_id="{run.run_id}"}} (\S+)',
                             metrics.decode())
        assert exported and float(exported.group(1)) == pytest.approx(st["train_loss"])
    finally:
        c.close()


def test_absurd_norm_limit_rejects_everything_and_says_why(tmp_path):
    c = Cluster(tmp_path, 2, "--max-task-attempts", "2")
    try:
        run = c.client.create_run(base_model="signal-tiny", lora_r=4, learning_rate=1e-3)
        job = run.train_federated(sample_examples()[:40], rounds=3, local_steps=2, batch_size=4,
                                  tasks_per_round=2, delta_norm_max=1e-12, round_timeout_s=60)
        st = job.wait(timeout=120, progress=False)
        assert st["status"] == "failed"
        assert st["version"] is None and run.info()["version"] == 0
        assert set(st["rejected"]) == {"norm"} and st["rejected"]["norm"] >= 4
        assert st["accepted"] == 0
        assert "fewer than 1 updates accepted" in st["reason"] and "norm" in st["reason"]
        assert "gave up after 3 attempts" in st["reason"]
    finally:
        c.close()


def test_dead_worker_round_closes_at_timeout_with_the_others(tmp_path):
    # The survivor is on probation: its delta waits for a check until the dead
    # worker has been silent for the lease timeout (then it counts unchecked).
    c = Cluster(tmp_path, 2, "--lease-timeout-s", "8")
    try:
        run = c.client.create_run(base_model="signal-tiny", lora_r=4, learning_rate=1e-3)
        job = run.train_federated(sample_examples(), rounds=2, local_steps=40, batch_size=8,
                                  tasks_per_round=2, min_updates_per_round=1,
                                  round_timeout_s=10)
        killed = {}

        def kill_first_busy_worker():
            name = wait_busy(c.client)
            time.sleep(0.5)  # well inside its local steps
            c.workers[int(name[1:])].kill9()
            killed["name"] = name

        t = threading.Thread(target=kill_first_busy_worker)
        t.start()
        st = job.wait(timeout=120, progress=False)
        t.join()
        assert killed, "no worker was ever busy"
        assert st["status"] == "done", st["reason"]
        first = st["history"][0]
        assert first["accepted"] == 1
        assert first["duration_s"] >= 9.0  # closed by the timeout, not by a full house
        assert st["version"] == 2
    finally:
        c.close()
