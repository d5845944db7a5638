"""Shard planning, work stealing and straggler re-issue, without HTTP."""

from __future__ import annotations

import asyncio
import time

import pytest
from apphelpers import new_scheduler

from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.data.types import Datum


def _scheduler(**kw) -> Scheduler:
    return new_scheduler(**{"straggler_min_s": 0.05, **kw})


def _datums(n: int, length: int = 10) -> list[Datum]:
    return [Datum(tuple(range(length)), tuple(range(length)), (1.0,) * length)] * n


def test_plan_follows_throughput_and_task_size():
    s = _scheduler()
    fast = s.register(name="h100", device="cuda", hardware={}, max_tokens_per_task=1000,
                      models=None)
    slow = s.register(name="4090", device="cuda", hardware={}, max_tokens_per_task=50,
                      models=None)
    fast.tokens_per_s, slow.tokens_per_s = 3000.0, 1000.0
    plan = s.plan_shards(_datums(40), "m")
    by_worker: dict[str, int] = {}
    for idx, w in plan:
        by_worker[w] = by_worker.get(w, 0) + len(idx)
        assert w != slow.worker_id or len(idx) * 10 <= 50  # cut to the slow card's task size
    assert by_worker == {fast.worker_id: 30, slow.worker_id: 10}
    assert sorted(i for idx, _ in plan for i in idx) == list(range(40))


def test_plan_without_workers_uses_default_task_size():
    plan = _scheduler(default_task_tokens=35).plan_shards(_datums(10), "m")
    assert [len(idx) for idx, _ in plan] == [3, 3, 3, 1]
    assert all(w is None for _, w in plan)


def test_workers_only_get_models_they_serve():
    async def go():
        s = _scheduler()
        picky = s.register(name="p", device="cpu", hardware={}, max_tokens_per_task=100,
                           models=("other",))
        s.add_task(kind="forward", run_id="r", base_model="m", version=0, payload={}, tokens=5)
        assert await s.lease(picky, 0.05) is None

    asyncio.run(go())


def _two_workers_and_a_task():
    """Workers a and b, and a task meant for a (call inside a running loop)."""
    s = _scheduler()
    a = s.register(name="a", device="cpu", hardware={}, max_tokens_per_task=100, models=None)
    b = s.register(name="b", device="cpu", hardware={}, max_tokens_per_task=100, models=None)
    t = s.add_task(kind="forward", run_id="r", base_model="m", version=0, payload={},
                   tokens=5, preferred_worker=a.worker_id)
    return s, a, b, t


async def _a_holds_a_task():
    """The same, with the task leased by a."""
    s, a, b, t = _two_workers_and_a_task()
    got_a = await s.lease(a, 0.1)
    assert got_a[0] is t
    return s, a, b, t, got_a


def test_straggler_is_reissued_and_first_result_wins():
    async def go():
        s, a, b, t, got_a = await _a_holds_a_task()
        # b is idle and a is late: after straggler_min_s b gets the same task.
        started = time.monotonic()
        got_b = await s.lease(b, 2.0)
        assert got_b is not None and got_b[0] is t and time.monotonic() - started >= 0.04
        assert len(t.leases) == 2
        s.complete(t, got_b[1].lease_id, {"from": "b"}, tokens=5, duration_s=0.1)
        assert t.future.result() == {"from": "b"}
        assert t.task_id in s.finished and t.task_id not in s.tasks

    asyncio.run(go())


def test_a_task_waiting_to_upload_is_no_straggler():
    async def go():
        s, a, b, t, got_a = await _a_holds_a_task()
        s.note_uploading(a)  # a computed it and waits for an upload slot
        assert await s.lease(b, 0.3) is None  # long past straggler_min_s: no copy for b
        assert len(t.leases) == 1

    asyncio.run(go())


def test_stealing_waits_for_the_preferred_worker_briefly():
    async def go():
        s, a, b, t = _two_workers_and_a_task()
        assert s._pick_pending(b) is None  # fresh shard: keep it for a
        t.created -= 1.0
        assert s._pick_pending(b) is t  # a did not come for it: b steals

    asyncio.run(go())


def test_release_requeues_then_fails():
    async def go():
        s = _scheduler(max_attempts=2)
        w = s.register(name="a", device="cpu", hardware={}, max_tokens_per_task=100, models=None)
        t = s.add_task(kind="forward", run_id="r", base_model="m", version=0, payload={},
                       tokens=5)
        _, lease = await s.lease(w, 0.1)
        s.release(t, lease.lease_id, "boom")
        assert list(s.pending) == [t.task_id]
        _, lease = await s.lease(w, 0.1)
        s.release(t, lease.lease_id, "boom again")
        with pytest.raises(Exception, match="failed after 2 attempts; last error: boom again"):
            t.future.result()

    asyncio.run(go())


def test_idle_long_polls_leave_nothing_behind():
    async def go():
        s = _scheduler()
        workers = [s.register(name=f"w{i}", device="cpu", hardware={}, max_tokens_per_task=100,
                              models=None) for i in range(20)]
        got = await asyncio.gather(*[s.lease(w, 1.2) for w in workers])
        assert got == [None] * 20
        assert not s._waiters  # timed-out waits took their futures with them
        # New work wakes a parked lease at once, not at its next re-check.
        waiting = asyncio.create_task(s.lease(workers[0], 5.0))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        t = s.add_task(kind="forward", run_id="r", base_model="m", version=0, payload={},
                       tokens=5)
        task, _ = await waiting
        assert task is t and time.monotonic() - started < 0.5

    asyncio.run(go())
