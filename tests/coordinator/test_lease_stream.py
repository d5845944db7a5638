"""A streamed lease (``?push=1``, ``Accept: application/vnd.signal.frames``):
while a worker waits for work, each version of a run it holds that is committed
meanwhile reaches it as the exact delta from the one before, and the task comes
last, with no delta left to send. Pushes stop for a worker that stopped getting
the run's tasks."""

from __future__ import annotations

import asyncio
import hashlib

from apphelpers import FakeWorker, Harness, fake_gradient, fake_step, frames, new_run

from rewardsignal.coordinator.api.workers import PUSH_CREDIT
from rewardsignal.protocol import (
    FRAMES,
    MSGPACK,
    XOR_DELTA,
    apply_xor_delta,
    pack,
)


def _stream(h: Harness, worker: FakeWorker, have: dict, timeout_s: float):
    return h.client.post(f"/v1/workers/{worker.worker_id}/lease?push=1&timeout_s={timeout_s}"
                         f"&deltas={XOR_DELTA}",
                         data=pack({"have": have}),
                         headers={"Content-Type": MSGPACK, "Accept": f"{FRAMES}, {MSGPACK}"})


def _weights(h: Harness, run_id: str, version: int) -> bytes:
    _, body = h.request("GET", f"/v1/runs/{run_id}/weights/{version}", expect=200)
    return body


def test_new_versions_reach_a_waiting_worker_before_its_task(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        rid = new_run(h)
        worker = FakeWorker(h)
        fake_step(h, worker, rid)  # version 1; the worker got a task of the run
        fake_gradient(h, worker, rid)
        v1 = _weights(h, rid, 1)

        async def go() -> list[dict]:
            resp = await _stream(h, worker, {rid: 1}, timeout_s=10)
            stream = frames(resp)
            step = asyncio.ensure_future(h.client.post(f"/v1/runs/{rid}/optim_step?wait_s=5",
                                                       json={}))
            pushed = await asyncio.wait_for(stream.__anext__(), 10)
            assert (await step).status == 200
            # The next forward_backward's task follows on the same stream.
            fb = asyncio.ensure_future(h.client.post(f"/v1/runs/{rid}/forward_backward",
                                                     json={"batch": [{"text": "three"}]}))
            task = await asyncio.wait_for(stream.__anext__(), 10)
            assert (await fb).status == 202
            rest = [f async for f in stream]
            return [pushed, task, *rest]

        pushed, task, *rest = h.call(go())
        assert rest == []  # the task is the last frame
        update = pushed["version"]
        assert (update["run_id"], update["version"]) == (rid, 2)
        assert update["weights_delta"]["from_version"] == 1
        v2 = apply_xor_delta(v1, update["weights_delta"]["data"])
        assert v2 == _weights(h, rid, 2)  # exact: the same bytes as a download
        assert hashlib.sha256(v2).hexdigest() == update["weights_sha256"]
        assert task["task"]["version"] == 2
        assert "weights_delta" not in task["task"]  # the worker holds version 2 already
    finally:
        h.close()


def test_a_step_is_answered_before_its_version_is_pushed(tmp_path):
    """``optim_step`` tells waiting leases of the new version once its result
    is on its request (``Operation.answered``): the answer's wake-up is queued
    ahead of the push, which a small adapter's step makes up to a third of a
    millisecond sooner. Once, and also when the step fails."""
    h = Harness(tmp_path / "data")
    try:
        rid = new_run(h)
        worker = FakeWorker(h)
        fake_gradient(h, worker, rid)
        coord = h.coordinator
        recent = coord.services.versions.recent
        told: list[tuple[int, list[bool]]] = []
        real = recent.announce

        def announce() -> None:
            steps = [r.future.done() for r in coord.requests._items.values()
                     if r.kind == "optim_step"]
            told.append((coord.runs[rid].version, steps))
            real()

        recent.announce = announce
        _, req = h.request("POST", f"/v1/runs/{rid}/optim_step", json={}, expect=202)
        h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)
        assert told == [(1, [True])]  # at version 1, with the step's result already set
        # A step that fails (nothing to apply) still tells them, once.
        _, req = h.request("POST", f"/v1/runs/{rid}/optim_step", json={}, expect=202)
        h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=400)
        assert told[1:] == [(1, [True, True])]
    finally:
        h.close()


def test_a_stream_ends_without_a_task_and_pushes_stop_for_an_idle_worker(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        rid = new_run(h)
        computing = FakeWorker(h, "computing")
        fake_step(h, computing, rid)
        # A worker the run's tasks no longer go to (here: it serves another model
        # now), with the credit its last task of the run gave it.
        idle = FakeWorker(h, "idle", models=["signal-small"])
        h.coordinator.scheduler.worker(idle.worker_id).push_credit[rid] = PUSH_CREDIT
        held = 1

        async def stream() -> list[dict]:
            resp = await _stream(h, idle, {rid: held}, timeout_s=0.3)
            return [f async for f in frames(resp)]

        got = []
        for _ in range(PUSH_CREDIT + 2):
            fake_step(h, computing, rid)  # a version the idle worker has not seen
            seen = h.call(stream())
            got.append(seen)
            for f in seen:
                held = f["version"]["version"]
        pushed = [f for seen in got for f in seen]
        # Every frame is a version (no task: the stream ended at its timeout), one
        # a step until the credit the worker's last task gave is spent.
        assert all("version" in f and "task" not in f for f in pushed)
        assert len(pushed) == PUSH_CREDIT
        assert held == 1 + PUSH_CREDIT
        assert [len(seen) for seen in got] == [1] * PUSH_CREDIT + [0, 0]
    finally:
        h.close()


def test_a_worker_that_leaves_while_its_lease_waits_holds_no_task(tmp_path):
    # No checks by recomputation: "other" is the only worker left to make them.
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        rid = new_run(h)
        gone = FakeWorker(h, "gone")

        async def leave() -> None:
            resp = await _stream(h, gone, {}, timeout_s=10)
            assert resp.status == 200
            resp.close()  # the worker's connection drops while its lease waits
            await asyncio.sleep(0.2)

        h.call(leave())
        _, req = h.request("POST", f"/v1/runs/{rid}/forward", json={"batch": [{"text": "a"}]},
                           expect=202)
        h.call(asyncio.sleep(0.5))
        # The stream of the worker that left ended with its connection (a task it
        # had been handed but could not be sent would go back in line): another
        # worker gets the task now, not after a lease expires (30 s).
        other = FakeWorker(h, "other")
        task = other.lease(timeout_s=5)
        assert task is not None and task["kind"] == "forward"
        lp = [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]
        code, _ = other.submit(task, result={"loss_sum": 1.0, "weight_sum": 1.0,
                                             "logprobs": lp}, duration_s=0.1)
        assert code == 200
        h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)
    finally:
        h.close()
