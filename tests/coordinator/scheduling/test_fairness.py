"""Sharing the fleet: a small run's work goes ahead of a big run's backlog, owners
share equally whatever their number of runs, and upload slots follow the same
order. Without HTTP."""

from __future__ import annotations

import asyncio

from apphelpers import new_scheduler

from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.scheduling.slots import UploadSlots


def _add(s: Scheduler, run_id: str, n: int, group: str = "u", tokens: int = 10):
    return [s.add_task(kind="forward_backward", run_id=run_id, base_model="m", version=0,
                       payload={}, tokens=tokens, group=group) for _ in range(n)]




def test_a_small_run_does_not_queue_behind_a_backlog():
    async def go():
        s = new_scheduler()
        _add(s, "big", 200)
        w = s.register(name="w", device="cpu", hardware={}, max_tokens_per_task=100,
                       models=None)
        served = []
        for i in range(30):
            if i == 10:
                _add(s, "small", 3)  # arrives behind 190 pending tasks of "big"
            task, lease = await s.lease(w, 0)
            served.append(task.run_id)
            s.complete(task, lease.lease_id, {}, tokens=task.tokens, duration_s=0.0)
        return served

    served = asyncio.run(go())
    assert served[:10] == ["big"] * 10
    assert served[10:13] == ["small"] * 3  # FIFO would have served them 190 leases later
    assert served[13:] == ["big"] * 17


def test_owners_share_equally_whatever_their_number_of_runs():
    async def go():
        s = new_scheduler()
        for r in range(4):
            _add(s, f"alice-{r}", 50, group="alice")
        _add(s, "bob-0", 50, group="bob")
        w = s.register(name="w", device="cpu", hardware={}, max_tokens_per_task=100,
                       models=None)
        groups = []
        for _ in range(40):
            task, lease = await s.lease(w, 0)
            groups.append(task.group)
            s.complete(task, lease.lease_id, {}, tokens=task.tokens, duration_s=0.0)
        return groups

    groups = asyncio.run(go())
    assert abs(groups.count("alice") - groups.count("bob")) <= 2


def test_upload_slots_go_to_the_lowest_rank_first():
    async def go():
        slots = UploadSlots(1)
        first = await slots.reserve(1.0, (5.0, 5.0))
        order: list[str] = []

        async def want(name: str, rank: tuple[float, float]) -> None:
            slot = await slots.reserve(5.0, rank)
            order.append(name)
            assert slots.take(slot)
            slots.release()

        waiters = [asyncio.create_task(want("busy-run", (100.0, 100.0))),
                   asyncio.create_task(want("small-run", (0.0, 1.0))),
                   asyncio.create_task(want("middle", (50.0, 0.0)))]
        await asyncio.sleep(0.05)  # all three are waiting
        assert slots.take(first)
        slots.release()
        await asyncio.gather(*waiters)
        return order

    assert asyncio.run(go()) == ["small-run", "middle", "busy-run"]


def test_a_timed_out_waiter_does_not_swallow_a_slot():
    async def go():
        slots = UploadSlots(1)
        held = await slots.reserve(1.0)
        assert await slots.reserve(0.05) is None  # gave up
        assert slots.take(held)
        slots.release()
        return await slots.reserve(0.05)

    assert asyncio.run(go()) is not None
