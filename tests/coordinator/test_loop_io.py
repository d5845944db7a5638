"""The event loop does no file I/O on the paths workers hit all the time: a
lease (its task message names the weights' sha256) and a weight download (its
ETag) are served from memory and threads. Checked with an audit hook that
records every file opened on the loop's thread while those requests run."""

from __future__ import annotations

import sys
import threading

import pytest
from apphelpers import FakeWorker, Harness

_opened: list[str] = []
_watch: dict[str, int | None] = {"thread": None}


def _hook(event: str, args: tuple) -> None:
    if event == "open" and threading.get_ident() == _watch["thread"]:
        _opened.append(str(args[0]))


sys.addaudithook(_hook)  # cannot be removed: it records only while a thread is watched


@pytest.fixture
def watched():
    def start(h: Harness) -> None:
        _opened.clear()
        _watch["thread"] = threading.get_ident()  # Harness runs its loop on this thread

    yield start
    _watch["thread"] = None


def test_lease_and_weight_download_open_no_file_on_the_loop(tmp_path, watched):
    h = Harness(tmp_path / "data")
    try:
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                           expect=201)
        rid = run["run_id"]
        worker = FakeWorker(h)
        h.request("POST", f"/v1/runs/{rid}/forward", json={"batch": [{"text": "a b"}]},
                  expect=202)
        headers = {"X-Signal-Worker": worker.worker_id}
        h.call(h.client.get("/healthz"))  # warm-up: lazily imported modules load here
        watched(h)
        task = worker.lease()
        assert task is not None and len(task["weights_sha256"]) == 64
        code, body = h.request("GET", task["weights_url"], headers=headers)
        assert code == 200 and len(body) > 0
        code, _ = h.request("HEAD", task["weights_url"], headers=headers)
        assert code == 200
        h.request("POST", f"/v1/workers/{worker.worker_id}/heartbeat", expect=200)
        data_files = [p for p in _opened if str(tmp_path) in p]
        assert data_files == [], f"opened on the event loop: {data_files}"
    finally:
        h.close()
