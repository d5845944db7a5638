"""The trust policy on its own: who is checked, who may check, and that a
reputation outlives the coordinator (a new service over the same database)."""

from __future__ import annotations

import asyncio
import math

from apphelpers import new_scheduler

from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.runs.state import Run, RunSpec
from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.store.db import Database
from rewardsignal.coordinator.trust.service import Trust
from rewardsignal.lora import LoraSpec


def _scheduler() -> Scheduler:
    return new_scheduler(default_task_tokens=1000, straggler_min_s=2)


def _trust(db, scheduler, **kw) -> Trust:
    return Trust(verify_fraction=kw.get("fraction", 0.1), probation_tasks=kw.get("probation", 3),
                 train_fraction=kw.get("train_fraction", 0.3), db=db, scheduler=scheduler,
                 metrics=Metrics(), runs={}, seed=7)


def _worker(s: Scheduler, name: str, token: str = ""):
    return s.register(name=name, device="cpu", hardware={}, max_tokens_per_task=100,
                      models=None, token_id=token)


def test_probation_then_sampling_then_reset(tmp_path):
    async def go():
        s = _scheduler()
        db = Database(tmp_path / "db.sqlite")
        trust = _trust(db, s)
        w = _worker(s, "w")
        assert all(trust.wants_check(w, "forward_backward") for _ in range(50))  # probation
        for _ in range(3):
            await trust.agreed(w.worker_id)
        assert trust.state(w)["state"] == "trusted"
        share = sum(trust.wants_check(w, "forward_backward") for _ in range(4000)) / 4000
        assert 0.08 < share < 0.12  # the verification fraction
        share = sum(trust.wants_check(w, "train") for _ in range(4000)) / 4000
        assert 0.27 < share < 0.33  # federated deltas: the train fraction
        await trust.disagreed(w.worker_id)
        assert trust.state(w)["state"] == "probation"
        await db.close()

    asyncio.run(go())


def test_fraction_zero_checks_nothing(tmp_path):
    s = _scheduler()
    trust = _trust(None, s, fraction=0.0)
    w = _worker(s, "w")
    assert not any(trust.wants_check(w, "forward_backward") for _ in range(100))
    assert trust.state(w)["state"] == "unchecked"


def _run(dropout: float) -> Run:
    spec = RunSpec("run-t", "local", "signal-tiny", "fp",
                   LoraSpec(dropout=dropout, target_modules=("q_proj",)), AdamWConfig(), 64, 0.0)
    return Run(spec, 0, {}, {}, 0, {})


def test_what_can_be_checked_at_all():
    """Results drawn with dropout differ between honest workers: not checkable.
    A train fraction of 0 checks no delta; verification off checks nothing."""
    s = _scheduler()
    trust = _trust(None, s)
    plain, dropout = _run(0.0), _run(0.1)
    assert all(trust.checkable(plain, k) for k in ("forward_backward", "forward", "sample",
                                                   "train"))
    assert not trust.checkable(dropout, "forward_backward")
    assert not trust.checkable(dropout, "train")
    assert trust.checkable(dropout, "forward") and trust.checkable(dropout, "sample")
    assert trust.metrics.verify_skipped.labels("dropout")._value.get() == 2
    assert not _trust(None, s, train_fraction=0.0).checkable(plain, "train")
    assert _trust(None, s, train_fraction=0.0).checkable(plain, "forward_backward")
    assert not _trust(None, s, fraction=0.0).checkable(plain, "forward")


def test_checkers_prefer_another_token_then_fall_back():
    s = _scheduler()
    trust = _trust(None, s)
    a, twin = _worker(s, "a", "tok1"), _worker(s, "twin", "tok1")
    # Only a worker under the same token is live: it checks, and that is said.
    barred, same = trust.checkers("run", "signal-tiny", {a.worker_id}, "tok1")
    assert barred == {a.worker_id} and same
    b = _worker(s, "b", "tok2")
    barred, same = trust.checkers("run", "signal-tiny", {a.worker_id}, "tok1")
    assert barred == {a.worker_id, twin.worker_id} and not same
    assert b.worker_id not in barred
    # No other worker at all: no check can be made.
    assert trust.checkers("run", "signal-tiny", {a.worker_id, twin.worker_id, b.worker_id},
                          "tok1") is None


def test_reputation_survives_a_restart(tmp_path):
    async def first():
        s = _scheduler()
        db = Database(tmp_path / "db.sqlite")
        trust = _trust(db, s)
        good, bad = _worker(s, "good", "t1"), _worker(s, "bad", "t2")
        await trust.agreed(good.worker_id, good.worker_id)
        await trust.quarantine(bad.worker_id, "disagreed")
        await db.close()
        return good.worker_id, bad.worker_id

    async def second(good_id, bad_id):
        s = _scheduler()
        for wid in (good_id, bad_id):
            s.restore_worker(wid, {"name": wid, "device": "cpu"})
        db = Database(tmp_path / "db.sqlite")
        trust = _trust(db, s)
        await trust.restore()
        await db.close()
        return trust, s

    good_id, bad_id = asyncio.run(first())
    trust, s = asyncio.run(second(good_id, bad_id))
    assert trust.reputations[good_id].agreements == 2
    assert trust.is_quarantined(bad_id) and s.workers[bad_id].quarantined
    assert s.workers[bad_id].quarantined_until == math.inf
