"""Fault injection with real processes: kill -9 of workers and of the coordinator."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
from harness import free_port, start_coordinator, start_worker, wait_busy, wait_workers
from reference import ReferenceTrainer

from rewardsignal import SignalClient
from rewardsignal.data import examples_to_datums, sample_examples
from rewardsignal.lora import LoraSpec
from rewardsignal.models import load_tokenizer
from rewardsignal.protocol import tensors_from_bytes

pytestmark = pytest.mark.slow
LR = 1e-3



def _weights(client, run, version):
    return tensors_from_bytes(client._loop.run(client._target._http(
        "GET", f"/v1/runs/{run.run_id}/weights/{version}", raw=True)))


def _reference(client, run):
    info = run.info()
    spec = LoraSpec(r=info["lora_r"], alpha=info["lora_alpha"],
                    target_modules=tuple(info["lora_target_modules"]), seed=info["seed"])
    return ReferenceTrainer("signal-tiny", spec, _weights(client, run, 0), lr=LR)


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_worker_killed_mid_task_step_completes_and_matches_reference(tmp_path):
    coord, url = start_coordinator(tmp_path / "data", "--lease-timeout-s", "3")
    workers = [start_worker(url, f"w{i}", "--max-tokens-per-task", "400") for i in range(2)]
    client = SignalClient(base_url=url)
    try:
        wait_workers(url, 2)
        run = client.create_run(base_model="signal-tiny", lora_r=4, learning_rate=LR, seed=1)
        ref = _reference(client, run)
        tok = load_tokenizer("signal-tiny")
        batch = sample_examples()[:24]
        killed = []

        def kill_when_busy():
            name = wait_busy(client)
            workers[int(name[1:])].kill9()
            killed.append(name)

        t = threading.Thread(target=kill_when_busy)
        t.start()
        res = run.forward_backward(batch)
        t.join()
        out = run.optim_step()
        ref_loss = ref.step(examples_to_datums(batch, tok))
        assert killed, "no worker was caught mid-task"
        assert out["version"] == 1 and res["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert _max_diff(_weights(client, run, 1), ref.adapter()) <= 1e-5
    finally:
        client.close()
        for w in workers:
            w.stop()
        coord.stop()


def _until_stored(data_dir, kind: str, timeout_s: float = 30.0) -> None:
    """Until a pending ``kind`` request is in the coordinator's database: a
    forward_backward's shards go out while its acceptance is being synced, so a
    worker busy with one does not mean it is stored yet (killed before that, the
    coordinator never answered it, and the SDK's retry queues it again)."""
    db = sqlite3.connect(f"file:{data_dir / 'signal.db'}?mode=ro", uri=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if db.execute("SELECT 1 FROM requests WHERE kind = ? AND status = 'pending'",
                          (kind,)).fetchone():
                return
            time.sleep(0.005)
    finally:
        db.close()
    raise AssertionError(f"no pending {kind} request stored within {timeout_s}s")


def test_coordinator_killed_between_forward_backward_and_optim_step(tmp_path):
    port = free_port()
    coord, url = start_coordinator(tmp_path / "data", "--port", port)
    worker = start_worker(url, "w0")
    client = SignalClient(base_url=url)
    try:
        wait_workers(url, 1)
        run = client.create_run(base_model="signal-tiny", lora_r=4, learning_rate=LR, seed=2)
        ref = _reference(client, run)
        tok = load_tokenizer("signal-tiny")
        ex = sample_examples()
        # Step 1: both halves accepted, then the coordinator dies before optim_step.
        run.forward_backward(ex[:6])
        run.forward_backward(ex[6:12])
        coord.kill9()
        coord, url2 = start_coordinator(tmp_path / "data", "--port", port)
        assert url2 == url
        assert run.info()["pending_forward_backward"] == 2  # both gradients survived
        assert run.optim_step()["version"] == 1
        ref.step(examples_to_datums(ex[:12], tok))
        assert _max_diff(_weights(client, run, 1), ref.adapter()) <= 1e-5
        # Step 2: the coordinator dies while a forward_backward is still being computed;
        # the request is re-run after the restart and the client's wait resumes.
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(run.forward_backward(ex[12:250])))
        t.start()
        wait_busy(client)
        _until_stored(tmp_path / "data", "forward_backward")
        coord.kill9()
        coord, _ = start_coordinator(tmp_path / "data", "--port", port)
        coord.wait_for(r"requeued 1 requests accepted before the restart", 10)
        t.join(timeout=120)
        assert "loss" in result
        assert run.optim_step()["version"] == 2
        ref.step(examples_to_datums(ex[12:250], tok))
        assert _max_diff(_weights(client, run, 2), ref.adapter()) <= 1e-5
        assert run.info()["version"] == 2  # nothing applied twice
    finally:
        client.close()
        worker.stop()
        coord.stop()


def test_coordinator_killed_mid_federated_round(tmp_path):
    port = free_port()
    coord, url = start_coordinator(tmp_path / "data", "--port", port)
    workers = [start_worker(url, f"w{i}") for i in range(2)]
    client = SignalClient(base_url=url)
    try:
        wait_workers(url, 2)
        run = client.create_run(base_model="signal-tiny", lora_r=4, learning_rate=2e-3)
        job = run.train_federated(sample_examples(), rounds=4, local_steps=20, batch_size=8,
                                  tasks_per_round=2, round_timeout_s=120)
        deadline = time.monotonic() + 120
        while job.status()["round"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # inside round 2
        coord.kill9()
        coord, _ = start_coordinator(tmp_path / "data", "--port", port)
        st = job.wait(timeout=300, progress=False)
        assert st["status"] == "done", st["reason"]
        assert st["round"] == 4
        info = run.info()
        assert info["version"] == 4  # four rounds, four versions: nothing counted twice
        rounds = [h["round"] for h in info["history"]]
        assert rounds == [1, 2, 3, 4]
    finally:
        client.close()
        for w in workers:
            w.stop()
        coord.stop()
