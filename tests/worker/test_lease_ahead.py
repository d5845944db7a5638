"""A worker asks for its next task with the result it sends, not a round trip
after: on a link 50 ms each way the next task comes 100 ms sooner
(``bench/step_overhead.py --delay-ms 50``). A real worker against an in-process
coordinator whose acceptance of results is slowed down: the lease goes in the
result's own request (one request a step), or, to a coordinator that does not
take one there, as a request of its own sent beside the result."""

from __future__ import annotations

import asyncio
import time

import pytest
from apphelpers import Harness, new_run, real_worker_steps, requests_to

from rewardsignal.worker.loop import Worker


def _watch(h: Harness) -> tuple[list[tuple[float, float]], list[float]]:
    """Each result's acceptance (start, end) and each lease's start, as the
    coordinator sees them, with results taken 0.3 s slower."""
    coord = h.coordinator
    accepting: list[tuple[float, float]] = []
    leases: list[float] = []
    real_submit, real_lease = coord.ingest.submit, coord.scheduler.lease

    async def slow_submit(*args, **kwargs):
        start = time.monotonic()
        await asyncio.sleep(0.3)  # a slow link or a busy coordinator
        try:
            return await real_submit(*args, **kwargs)
        finally:
            accepting.append((start, time.monotonic()))

    async def lease(w, timeout_s):
        leases.append(time.monotonic())
        return await real_lease(w, timeout_s)

    coord.ingest.submit = slow_submit
    coord.scheduler.lease = lease
    return accepting, leases


def test_the_next_lease_goes_in_the_request_of_the_result(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        rid = new_run(h)
        accepting, leases = _watch(h)
        worker = real_worker_steps(h, rid, 3)
        assert worker.tasks_done == 3 and len(accepting) == 3
        # The first lease was a request of its own; the next two came with the
        # first two results, each right once its result was taken; the last
        # result asks for nothing more (max_tasks).
        assert len(leases) == 3
        for (_, end), t in zip(accepting[:2], leases[1:], strict=True):
            assert end <= t <= end + 0.25, (accepting, leases)
        assert requests_to(h, "/v1/workers/{worker_id}/lease") == 1
        assert requests_to(h, "/v1/tasks/{task_id}/result") == 3
    finally:
        h.close()


def test_a_coordinator_that_takes_no_lease_with_a_result_gets_one_beside_it(
        tmp_path, monkeypatch: pytest.MonkeyPatch):
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        rid = new_run(h)
        accepting, leases = _watch(h)
        register = Worker.register

        async def as_before(self: Worker) -> None:  # a coordinator from before it
            await register(self)
            self._lease_with_result = False
            await self.leasing.offer(None)  # nor a channel

        monkeypatch.setattr(Worker, "register", as_before)
        worker = real_worker_steps(h, rid, 3)
        assert worker.tasks_done == 3 and len(accepting) == 3
        # The leases after the first two results began while those were being
        # accepted; the last result asks for nothing more (max_tasks).
        for start, end in accepting[:2]:
            assert any(start <= t <= end for t in leases), (accepting, leases)
        last_start, last_end = accepting[2]
        assert not any(last_start <= t <= last_end for t in leases)
        assert requests_to(h, "/v1/workers/{worker_id}/lease") == 3
    finally:
        h.close()
