"""Workers ride out a coordinator restart; Ctrl-C stops a worker cleanly."""

from __future__ import annotations

import signal
import time

import pytest
from harness import free_port, start_coordinator, start_worker, wait_workers

from rewardsignal import SignalClient
from rewardsignal.data import sample_examples

pytestmark = pytest.mark.slow



def test_worker_survives_coordinator_restart_and_run_resumes(tmp_path):
    port = free_port()
    coord, url = start_coordinator(tmp_path / "data", "--port", port)
    worker = start_worker(url, "survivor")
    client = SignalClient(base_url=url)
    try:
        wait_workers(url, 1)
        run = client.create_run(base_model="signal-tiny", lora_r=2, learning_rate=1e-3)
        for _ in range(2):
            run.forward_backward(sample_examples()[:4])
            run.optim_step()
        coord.stop()
        time.sleep(1.0)  # the worker sees the coordinator gone and backs off
        coord, url2 = start_coordinator(tmp_path / "data", "--port", port)
        assert url2 == url
        worker.wait_for(r"coordinator unreachable", 30)
        assert run.info()["version"] == 2  # resumed from its checkpoint
        run.forward_backward(sample_examples()[4:8])
        assert run.optim_step()["version"] == 3
        # The worker kept its id across the restart and went on serving.
        (w,) = client.list_workers()
        assert w["name"] == "survivor" and w["tasks_completed"] >= 1
        assert "registering again" not in worker.output()
    finally:
        client.close()
        worker.stop()
        coord.stop()


def test_ctrl_c_stops_an_idle_worker_cleanly(tmp_path):
    coord, url = start_coordinator(tmp_path / "data")
    worker = start_worker(url, "quitter")
    try:
        wait_workers(url, 1)
        worker.proc.send_signal(signal.SIGINT)
        assert worker.proc.wait(timeout=15) == 0
        worker.wait_for(r"stopped after 0 tasks", 5)
    finally:
        worker.stop()
        coord.stop()
