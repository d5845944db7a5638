"""The memory for held results as the scheduler sees it: a lease whose result
will be held is granted only while it fits, check tasks go first, and every
way a lease ends gives its share back. Without HTTP."""

from __future__ import annotations

import asyncio
import gc

from apphelpers import new_scheduler

from rewardsignal.coordinator.scheduling.holds import HoldBudget
from rewardsignal.coordinator.scheduling.scheduler import Scheduler

G = 1000  # what one held result weighs here


def test_budget_counts_takes_resizes_and_releases_once():
    woken = []
    b = HoldBudget(2500, wake=lambda: woken.append(1))
    assert b.take(0) is None and b.fits(10**9)  # nothing held: anything fits
    h1, h2 = b.take(G), b.take(G)
    assert b.used == 2 * G and not b.fits(G) and b.fits(500) and b.fits(0)
    h1.resize(400)
    assert b.used == 1400 and b.fits(G)
    h1.release()
    h1.release()
    assert b.used == G and len(woken) == 2  # room given back twice: wake a lease each time
    del h2
    gc.collect()  # dropped without a release: given back all the same
    assert b.used == 0 and b.peak == 2 * G
    big = b.take(10 * G)  # counted as it is, even past the limit
    assert b.used == 10 * G and not b.fits(1)
    big.release()


def _scheduler(limit: int) -> Scheduler:
    s = new_scheduler(hold_limit_bytes=limit)
    s.hold_cost = lambda w, t: G  # every worker's result is held (on probation)
    return s


def _worker(s: Scheduler, name: str):
    return s.register(name=name, device="cpu", hardware={}, max_tokens_per_task=100,
                      models=None)


def _add(s: Scheduler, n: int, **kw):
    tasks = [s.add_task(kind="forward_backward", run_id="r", base_model="m", version=0,
                        payload={}, tokens=10, **kw) for _ in range(n)]
    for t in tasks:
        t.checkable = True
    return tasks


def test_a_lease_whose_result_is_held_waits_for_room_and_takes_checks_meanwhile():
    async def go():
        s = _scheduler(limit=2 * G)
        a, b, c = (_worker(s, n) for n in "abc")
        _add(s, 5)
        ta, la = await s.lease(a, 0)
        tb, lb = await s.lease(b, 0)
        assert s.holds.used == 2 * G
        assert await s.lease(c, 0) is None  # no room for a third
        check = s.add_task(kind="forward_backward", run_id="r", base_model="m", version=0,
                           payload={}, tokens=10, exclude=frozenset({a.worker_id}), keep=True)
        check.checkable = True
        tc, lc = await s.lease(c, 0)
        assert tc is check  # ahead of the 3 tasks queued before it, and free
        assert s.holds.used == 2 * G
        # The first result is held: its lease's share moves to the result.
        held = s.take_hold(ta, la.lease_id)
        s.complete(ta, la.lease_id, {}, tokens=10, duration_s=0.0)
        assert s.holds.used == 2 * G and await s.lease(c, 0) is None
        held.release()  # checked and summed
        t2, _ = await s.lease(c, 0)
        assert t2.keep is False and s.holds.used == 2 * G
        # A lease that ends without a result gives its share back.
        s.release(tb, lb.lease_id, "worker failed")
        assert s.holds.used == G
        s.cancel(t2, "request ended")
        assert s.holds.used == 0

    asyncio.run(go())


def test_checks_are_served_first_in_order_and_planned_shards_stay_planned():
    async def go():
        s = _scheduler(limit=0)  # one held result at a time
        a, b = _worker(s, "a"), _worker(s, "b")
        (first,) = _add(s, 1)
        (own,) = _add(s, 1, preferred_worker=b.worker_id)
        ta, la = await s.lease(a, 0)
        assert ta is first and s.holds.used == G
        checks = [s.add_task(kind="forward_backward", run_id="r", base_model="m", version=0,
                             payload={"i": i}, tokens=10, keep=True) for i in range(3)]
        got = []
        for _ in range(3):
            t, lease = await s.lease(b, 0)
            got.append(t)
            s.complete(t, lease.lease_id, {}, tokens=10, duration_s=0.0)
        assert got == checks  # first in, first out, ahead of b's own shard
        assert await s.lease(b, 0) is None  # its own shard: no room while a's is out
        s.complete(ta, la.lease_id, {}, tokens=10, duration_s=0.0)
        t, _ = await s.lease(b, 0)
        assert t is own  # still planned for it

    asyncio.run(go())


def test_checks_that_exclude_a_worker_do_not_hide_the_runs_other_work():
    async def go():
        s = _scheduler(limit=10 * G)
        s.hold_cost = lambda w, t: 0  # a trusted worker: nothing of its is held
        w = _worker(s, "w")
        for _ in range(300):  # more than a lease looks at, none of them for w
            s.add_task(kind="forward_backward", run_id="r", base_model="m", version=0,
                       payload={}, tokens=10, exclude=frozenset({w.worker_id}), keep=True)
        (shard,) = _add(s, 1)
        got = await s.lease(w, 0)
        assert got is not None and got[0] is shard

    asyncio.run(go())


def test_a_worker_with_no_room_looks_no_further_than_the_first_task_it_cannot_take():
    async def go():
        s = _scheduler(limit=0)
        calls = []
        s.hold_cost = lambda w, t: calls.append(t) or G
        a, b = _worker(s, "a"), _worker(s, "b")
        _add(s, 1000)
        await s.lease(a, 0)  # nothing held: one lease fits
        calls.clear()
        assert await s.lease(b, 0) is None
        assert len(calls) <= 2  # not one per pending task (the queue and stragglers)

    asyncio.run(go())
