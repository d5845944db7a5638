"""A result that carries the worker's next lease (``POST /v1/tasks/{id}/result``
with a ``lease`` field and ``Accept: application/vnd.signal.frames``): the
result's answer is the first frame, and the same request then goes on as a
streamed lease, so a worker that keeps up makes one request a step. A bad
lease is a 400 that leaves the result untaken."""

from __future__ import annotations

import asyncio

from apphelpers import (
    FakeWorker,
    Harness,
    computed_fb,
    fb_result,
    frames,
    leased_forward_backward,
    new_run,
    requests_to,
)

from rewardsignal.protocol import (
    FRAMES,
    MSGPACK,
    RESULT,
    XOR_DELTA,
    apply_xor_delta,
)


def _post(h: Harness, task: dict, body: bytes, accept: str = f"{FRAMES}, {MSGPACK}"):
    return h.client.post(f"/v1/tasks/{task['task_id']}/result", data=body,
                         headers={"Content-Type": RESULT, "Accept": accept})


def test_a_result_is_answered_and_its_request_goes_on_as_the_next_lease(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        _, reg = h.request("POST", "/v1/workers/register", expect=201,
                           json={"name": "w", "device": "cpu", "max_tokens_per_task": 100000})
        assert reg["lease_with_result"] is True  # what a worker looks for to send one
        rid = new_run(h)
        worker = FakeWorker(h, "w2")  # its lease() makes the one /lease request
        fb, task = leased_forward_backward(h, worker, rid)
        v0 = h.request("GET", f"/v1/runs/{rid}/weights/0", expect=200)[1]

        async def go() -> list[dict]:
            body = fb_result(h, worker, task, lease={"have": {rid: 0}, "timeout_s": 10,
                                                   "deltas": [XOR_DELTA]})
            resp = await _post(h, task, body)
            stream = frames(resp)
            first = await asyncio.wait_for(stream.__anext__(), 10)
            # The step goes on while the lease waits: its version is pushed, and
            # the next request's task ends the stream.
            step = await h.client.post(f"/v1/runs/{rid}/optim_step?wait_s=10", json={})
            assert step.status == 200, await step.text()
            pushed = await asyncio.wait_for(stream.__anext__(), 10)
            nxt = await h.client.post(f"/v1/runs/{rid}/forward_backward",
                                      json={"batch": [{"text": "two"}]})
            assert nxt.status == 202
            last = await asyncio.wait_for(stream.__anext__(), 10)
            rest = [f async for f in stream]
            return [first, pushed, last, *rest]

        first, pushed, last, *rest = h.call(go())
        assert first == {"answer": {"status": "accepted"}}
        h.request("GET", f"/v1/requests/{fb['request_id']}?timeout_s=5", expect=200)
        update = pushed["version"]
        assert (update["run_id"], update["version"]) == (rid, 1)
        v1 = h.request("GET", f"/v1/runs/{rid}/weights/1", expect=200)[1]
        assert apply_xor_delta(v0, update["weights_delta"]["data"]) == v1
        assert last["task"]["version"] == 1 and "weights_delta" not in last["task"]
        assert rest == []
        # One request carried the result and the lease: none went to /lease
        # but worker.lease()'s.
        assert requests_to(h, "/v1/workers/{worker_id}/lease") == 1
    finally:
        h.close()


def test_a_bad_lease_is_refused_and_the_result_is_not_taken(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        rid = new_run(h)
        worker = FakeWorker(h)
        fb, task = leased_forward_backward(h, worker, rid)

        async def post(body: bytes, accept: str = f"{FRAMES}, {MSGPACK}") -> tuple[int, str]:
            resp = await _post(h, task, body, accept)
            return resp.status, await resp.text()

        bad = [({"have": {rid: -1}}, "have"), ({"have": {}, "timeout_s": "soon"}, "timeout_s"),
               ({"have": {}, "colour": 1}, "colour"), ("now", "lease")]
        for lease, named in bad:
            status, text = h.call(post(fb_result(h, worker, task, lease=lease)))
            assert status == 400 and "lease" in text and named in text, (lease, text)
        # A lease the answer could not carry (no frames accepted) is refused too.
        status, text = h.call(post(fb_result(h, worker, task, lease={"have": {}}), MSGPACK))
        assert status == 400 and FRAMES in text
        assert not h.coordinator.scheduler.finished  # nothing counted
        # The same result without a lease is then taken: it was not a duplicate.
        code, answer = worker.submit(task, as_result=True, **computed_fb(h, task))
        assert (code, answer) == (200, {"status": "accepted"})
        h.request("GET", f"/v1/requests/{fb['request_id']}?timeout_s=5", expect=200)
    finally:
        h.close()


def test_a_refused_result_takes_no_lease(tmp_path):
    """A result the coordinator refuses (here: its lease is not this worker's)
    answers as it always did, and no lease is taken for it."""
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        rid = new_run(h)
        worker, other = FakeWorker(h, "a"), FakeWorker(h, "b")
        _, task = leased_forward_backward(h, worker, rid)
        leases = []
        real = h.coordinator.scheduler.lease

        async def lease(w, timeout_s):
            leases.append(w.worker_id)
            return await real(w, timeout_s)

        h.coordinator.scheduler.lease = lease

        async def go() -> tuple[int, object]:
            resp = await _post(h, task, fb_result(h, other, task, lease={"have": {}}))
            return resp.status, await resp.read()

        status, body = h.call(go())
        assert status == 409 and b"unknown_lease" in body
        assert leases == []
    finally:
        h.close()
