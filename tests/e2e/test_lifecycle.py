"""Saying so when nothing can make progress, with real processes: one
coordinator per data directory, a taken port, a fast SIGTERM with clients
waiting, a worker that says goodbye, a worker pointed at the wrong place, and
a request no live worker can take."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request

import pytest
from harness import Proc, free_port, start_coordinator, start_worker, wait_workers

from rewardsignal import SignalClient
from rewardsignal.errors import NoWorkerError

pytestmark = pytest.mark.slow


def _get(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def _coordinator_args(data_dir, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "rewardsignal.cli", "coordinator", "--data-dir",
            str(data_dir), *extra]


def test_one_coordinator_per_data_directory_and_per_port(tmp_path):
    port = free_port()
    first, url = start_coordinator(tmp_path / "data", "--port", port)
    try:
        second = Proc(_coordinator_args(tmp_path / "data", "--port", "0"), "second")
        assert second.proc.wait(timeout=60) != 0
        out = second.output()
        assert f"pid {first.proc.pid}" in out and str(tmp_path / "data") in out
        assert "Traceback" not in out
        taken = Proc(_coordinator_args(tmp_path / "other", "--port", port), "taken")
        assert taken.proc.wait(timeout=60) != 0
        assert f"cannot listen on 127.0.0.1:{port}" in taken.output()
        assert "Traceback" not in taken.output()
        assert _get(url + "/healthz")["status"] == "ok"  # the first one keeps serving
    finally:
        first.stop()
    # kill -9 leaves no stale lock behind
    again, url = start_coordinator(tmp_path / "data", "--port", "0")
    again.kill9()
    again, url = start_coordinator(tmp_path / "data", "--port", "0")
    again.stop()


def test_sigterm_with_a_client_waiting_stops_in_seconds(tmp_path):
    coord, url = start_coordinator(tmp_path / "data")
    client = SignalClient(base_url=url, retry_window_s=1)
    try:
        run = client.create_run(base_model="signal-tiny", lora_r=2)
        waiter = threading.Thread(target=lambda: _swallow(run.forward_backward,
                                                          [{"text": "a b"}]))
        waiter.start()  # no worker: the request stays pending, the client long-polls
        time.sleep(1.0)
        started = time.monotonic()
        coord.proc.send_signal(signal.SIGTERM)
        coord.proc.wait(timeout=30)
        took = time.monotonic() - started
        assert took < 10, f"shutdown took {took:.1f}s"
        waiter.join(timeout=30)
        assert "stopped" in coord.output()
    finally:
        client.close()
        coord.stop()


def _swallow(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # the coordinator went away under it, on purpose
        pass


def test_a_worker_that_says_goodbye_is_gone_at_once(tmp_path):
    coord, url = start_coordinator(tmp_path / "data", "--worker-retention-s", "3")
    worker = start_worker(url, "leaver")
    try:
        wait_workers(url, 1)
        worker.stop()  # SIGTERM: the worker says goodbye on its way out
        (w,) = _get(url + "/v1/workers")["workers"]
        assert w["status"] == "gone"
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert re.search(r'signal_workers\{state="registered"\} 0\.0', metrics)
        deadline = time.monotonic() + 30
        while _get(url + "/v1/workers")["workers"]:
            assert time.monotonic() < deadline, "a gone worker stayed listed past retention"
            time.sleep(0.5)
        metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        assert "leaver" not in metrics
    finally:
        worker.stop()
        coord.stop()


def test_a_worker_pointed_at_the_wrong_place_says_so(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    worker = start_worker(dead, "lost")
    try:
        worker.wait_for(rf"coordinator unreachable at {re.escape(dead)}: .*errno 111.*"
                        r"retrying in \d+s", 60)
    finally:
        worker.stop()
    coord, url = start_coordinator(tmp_path / "data")
    try:
        wrong = start_worker(url + "/not-signal", "wrong")
        assert wrong.proc.wait(timeout=60) == 2
        assert "answered 404" in wrong.output() and "Traceback" not in wrong.output()
    finally:
        coord.stop()


def test_no_live_worker_fails_with_a_clear_error(tmp_path, capfd):
    coord, url = start_coordinator(tmp_path / "data", "--no-worker-grace-s", "2")
    client = SignalClient(base_url=url)
    try:
        run = client.create_run(base_model="signal-tiny", lora_r=2)
        with pytest.raises(NoWorkerError) as info:
            run.forward_backward([{"text": "nobody home"}])
        assert run.run_id in info.value.message and "signal-tiny" in info.value.message
        err = capfd.readouterr().err
        assert err.count("is waiting for a worker") == 1
    finally:
        client.close()
        coord.stop()
