"""Bodies die with their request. aiohttp keeps a keep-alive connection's last
request and response objects alive until the next request on that connection,
so a handler that let either hold a body pinned one body per idle worker (the
load benchmark found 2.4 GB with 1,000 workers). These measure with tracemalloc
what stays allocated once a large request is answered and its connection idles."""

from __future__ import annotations

import gc
import json
import tracemalloc

from apphelpers import FakeWorker

from rewardsignal.protocol import MSGPACK, pack


def _retained(h, method: str, path: str, **kw) -> tuple[int, int, int]:
    """(bytes still allocated once the call is answered and its keep-alive connection
    idles, status, response size). The response is read in chunks and dropped, so
    what stays is the coordinator's."""

    async def go() -> tuple[int, int]:
        resp = await h.client.request(method, path, **kw)
        size = 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
        resp.release()
        return resp.status, size

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        status, size = h.call(go())
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - base, status, size
    finally:
        tracemalloc.stop()


def test_an_uploaded_body_is_not_pinned_by_the_idle_connection(harness):
    line = json.dumps({"text": "a long line " * 80}) + "\n"
    data = (line * 4000).encode()  # ~4 MB
    n = len(data)
    kept, status, _ = _retained(harness, "POST", "/v1/datasets?name=big.jsonl", data=data)
    assert status == 201
    assert kept < n // 4, f"{kept} bytes still held after a {n}-byte upload"


def test_a_submission_body_is_not_pinned(harness):
    _, run = harness.request("POST", "/v1/runs", json={"base_model": "signal-tiny",
                                                      "lora_r": 2}, expect=201)
    w = FakeWorker(harness)
    harness.request("POST", f"/v1/runs/{run['run_id']}/forward", json={"batch": [{"text": "x"}]},
                    expect=202)
    task = w.lease()
    assert task is not None
    filler = b"\0" * 3_000_000  # a malformed tensors field: read, then rejected
    body = pack({"worker_id": w.worker_id, "lease_id": task["lease_id"],
                 "fingerprint": task["fingerprint"], "version": task["version"],
                 "result": {"loss_sum": 0.0, "weight_sum": 1.0, "logprobs": [[0.0]]},
                 "tensors": filler})
    kept, status, _ = _retained(harness, "POST", f"/v1/tasks/{task['task_id']}/result",
                                data=body, headers={"Content-Type": MSGPACK})
    assert 400 <= status < 500
    assert kept < len(filler) // 4, f"{kept} bytes still held after a {len(body)}-byte submission"


def test_served_weights_are_not_pinned(harness):
    _, run = harness.request("POST", "/v1/runs", json={"base_model": "signal-tiny",
                                                      "lora_r": 64}, expect=201)
    kept, status, size = _retained(harness, "GET", f"/v1/runs/{run['run_id']}/weights/0")
    assert status == 200
    assert size > 200_000
    assert kept < size // 4, f"{kept} bytes still held after serving {size} bytes of weights"
