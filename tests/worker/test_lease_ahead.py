"""A worker asks for its next task while it sends a result, not a round trip
after: on a link 50 ms each way the next task comes 100 ms sooner
(``bench/step_overhead.py --delay-ms 50``). A real worker against an in-process
coordinator whose acceptance of results is slowed down."""

from __future__ import annotations

import asyncio
import time

from apphelpers import Harness, new_run, real_worker_steps


def test_the_next_lease_goes_out_while_a_result_is_being_accepted(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        rid = new_run(h)
        coord = h.coordinator
        accepting: list[tuple[float, float]] = []  # (start, end) of each result's acceptance
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
        worker = real_worker_steps(h, rid, 3)
        assert worker.tasks_done == 3 and len(accepting) == 3
        # The leases after the first two results began while those were being
        # accepted; the last result asks for nothing more (max_tasks).
        for start, end in accepting[:2]:
            assert any(start <= t <= end for t in leases), (accepting, leases)
        last_start, last_end = accepting[2]
        assert not any(last_start <= t <= last_end for t in leases)
    finally:
        h.close()
