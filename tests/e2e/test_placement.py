"""Placement with real processes: `signal-worker --memory-gb` caps what a CPU
worker offers; a run that does not fit it is created with a warning the SDK
prints, trains on a worker that can hold it, and is never leased to the small
one; `signal status` says which worker serves which run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from harness import start_coordinator, start_worker, wait_workers

from rewardsignal import SignalClient

pytestmark = pytest.mark.slow


def test_memory_gb_keeps_a_run_off_a_worker_too_small_for_it(tmp_path, capsys):
    coord, url = start_coordinator(tmp_path / "data")
    # signal-tiny at max_length 2048 on CPU needs ~0.6 GiB (eager attention scores).
    small = start_worker(url, "small", "--memory-gb", "0.05")
    workers = [small]
    client = SignalClient(base_url=url)
    try:
        wait_workers(url, 1)
        small.wait_for(r"offers 0\.05 GiB")
        small.wait_for(r"cannot serve nf4/int8 runs: quantized bases need a CUDA GPU")
        run = client.create_run(base_model="signal-tiny", lora_r=2, learning_rate=1e-3)
        err = capsys.readouterr().err
        assert "signal: warning: no registered worker can host" in err
        assert "small: needs about 0.6" in err

        status = subprocess.run([sys.executable, "-m", "rewardsignal.cli", "status",
                                 "--coordinator", url], capture_output=True, text=True,
                                check=True).stdout
        assert f"small x {run.run_id}: needs about" in status

        workers.append(start_worker(url, "big", "--memory-gb", "4"))
        wait_workers(url, 2)
        batch = [{"text": f"example number {i}"} for i in range(8)]
        losses = []
        for _ in range(3):
            run.forward_backward(batch=batch)
            losses.append(run.optim_step()["loss"])
        assert losses[-1] < losses[0]

        st = {w["name"]: w for w in client.status()["workers"]}
        assert st["small"]["tasks_completed"] == 0 and st["big"]["tasks_completed"] >= 3
        assert st["big"]["can_serve"] == [run.run_id]
        assert st["small"]["memory_bytes"] == int(0.05 * 2**30)
    finally:
        client.close()
        for w in workers:
            w.stop()
        coord.stop()
