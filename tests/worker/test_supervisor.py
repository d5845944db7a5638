"""`signal-worker --gpus`: one worker process per GPU under one supervisor,
tested with CPU stand-ins (``--cpu-standins``) as real processes on 127.0.0.1:
each child registers on its own and computes, one Ctrl-C stops them all, and
the children's exit codes come out of the supervisor."""

from __future__ import annotations

import os
import re
import signal
import sys

import pytest
from harness import Proc, start_coordinator, wait_workers

from rewardsignal import SignalClient
from rewardsignal.errors import ValidationError
from rewardsignal.worker.supervisor import children_for, group_gpus, parse_gpus

pytestmark = pytest.mark.slow


def _box(url: str, gpus: str, *extra: str) -> Proc:
    return Proc([sys.executable, "-m", "rewardsignal.cli", "worker", "--coordinator", url,
                 "--name", "box", "--gpus", gpus, "--cpu-standins", "--threads", "1", *extra],
                "box")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a parent that is gone) counts as stopped.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_one_registration_per_gpu_and_ctrl_c_stops_them_all(tmp_path):
    coord, url = start_coordinator(tmp_path / "data")
    box = _box(url, "0,1,2", "--memory-gb", "2")
    client = SignalClient(base_url=url)
    try:
        wait_workers(url, 3)
        workers = {w["name"]: w for w in client.list_workers()}
        assert set(workers) == {"box-gpu0", "box-gpu1", "box-gpu2"}
        assert {w["memory_bytes"] for w in workers.values()} == {2 * 2**30}
        pids = [int(box.wait_for(rf"started box-gpu{i} \(pid (\d+)\)").group(1))
                for i in range(3)]
        assert all(_alive(p) for p in pids)

        run = client.create_run(base_model="signal-tiny", lora_r=2)
        run.forward_backward(batch=[{"text": f"example {i}"} for i in range(12)])
        assert run.optim_step()["version"] == 1

        box.proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the supervisor
        assert box.proc.wait(timeout=60) == 0
        out = box.output()
        for i in range(3):
            assert re.search(rf"box-gpu{i} \(pid \d+\) exited with code 0", out), out
        assert "all 3 workers stopped; exit code 0" in out
        assert not any(_alive(p) for p in pids)
        # Each child said goodbye: the coordinator shows them gone at once.
        assert {w["status"] for w in client.list_workers()} == {"gone"}
    finally:
        client.close()
        box.stop()
        coord.stop()


def test_children_exit_codes_surface(tmp_path):
    coord, url = start_coordinator(tmp_path / "data", "--worker-token", "right")
    box = _box(url, "0,1", "--token", "wrong")
    try:
        assert box.proc.wait(timeout=90) == 2
        out = box.output()
        assert out.count("refused by") == 2, out
        assert re.search(r"box-gpu0 \(pid \d+\) exited with code 2", out)
        assert "all 2 workers stopped; exit code 2" in out
    finally:
        box.stop()
        coord.stop()


def test_gpus_flag_parsing():
    assert parse_gpus("all", 4) == [0, 1, 2, 3]
    assert parse_gpus("1,3", 4) == [1, 3]
    for bad, available in (("all", 0), ("4", 4), ("0,0", 2), ("x", 2), ("", 2), ("-1", 2)):
        with pytest.raises(ValidationError):
            parse_gpus(bad, available)


def test_groups_of_gpus_make_one_worker_each_with_the_model_spread(monkeypatch):
    """--gpus-per-worker N: one child per N GPUs, pinned to them (through the
    box's own CUDA_VISIBLE_DEVICES), spreading each base over them."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4,5,6")
    flags = ["--coordinator", "http://127.0.0.1:1"]
    pairs = children_for([0, 1, 2, 3], flags, "box", cpu_standins=False, per_worker=2)
    assert [c.name for c in pairs] == ["box-gpu0+1", "box-gpu2+3"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in pairs] == ["3,4", "5,6"]
    assert pairs[0].argv[-6:] == ["--device", "cuda", "--device-map", "auto",
                                  "--name", "box-gpu0+1"]
    singles = children_for([1, 3], flags, "box", cpu_standins=False)
    assert [(c.name, c.env["CUDA_VISIBLE_DEVICES"]) for c in singles] == [("box-gpu1", "4"),
                                                                         ("box-gpu3", "6")]
    assert "--device-map" not in singles[0].argv
    assert group_gpus([0, 1, 2, 3], 4) == [[0, 1, 2, 3]]
    for gpus, n in (([0, 1, 2], 2), ([0], 0)):
        with pytest.raises(ValidationError, match="do not split"):
            group_gpus(gpus, n)
