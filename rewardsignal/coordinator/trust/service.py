"""The trust service: which results are checked, who may check them, and what
a verdict does to a worker's reputation (kept in the database across restarts).

Policy: with ``verify_fraction`` 0 nothing is checked (a trusted fleet). Else a
worker on probation has every ``forward_backward``/``forward``/``sample`` result
checked; a trusted one has each checked with probability ``verify_fraction``.
Federated ``train`` deltas follow the same rule with ``train_fraction`` (0: none
checked, probation included). Results drawn with dropout (a run with
``lora_dropout`` > 0: ``forward_backward`` and ``train``) differ between honest
workers by the masks drawn, so they are not checked (counted:
``signal_verification_skipped{reason="dropout"}``). A checker
is never the worker itself, and is a worker under another token whenever one is
live; when only workers under the same token are live, one of them checks
(counted: ``signal_verification_same_token``); when no other worker is live, the
result counts unchecked (``signal_verification_skipped{reason="no_other_worker"}``)
and the worker's reputation does not move.

Held results take memory until their check: the scheduler leases a task whose
result will be held only while the memory for held results has room
(``scheduling.holds``), and ``hold_cost`` tells it what such a result weighs.
"""

from __future__ import annotations

import logging
import math
import random
import time

from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.scheduling.tasks import Task
from rewardsignal.coordinator.scheduling.workers import WorkerInfo
from rewardsignal.coordinator.store.db import Database
from rewardsignal.coordinator.trust.reputation import Reputation

log = logging.getLogger("signal.trust")

CHECKED_KINDS = ("forward_backward", "forward", "sample", "train")
# Kinds whose held result weighs an adapter (a gradient). A train task's delta is
# held by its federated round whether or not it is checked; forward and sample
# results are a few numbers per token.
_HEAVY_KINDS = ("forward_backward",)
# Kinds whose computation draws dropout masks in a run with lora_dropout > 0.
_DROPOUT_KINDS = ("forward_backward", "train")


class Trust:
    def __init__(self, *, verify_fraction: float, probation_tasks: int, db: Database,
                 scheduler: Scheduler, metrics: Metrics, runs: dict[str, Run],
                 train_fraction: float = 0.05, seed: int | None = None,
                 live_window_s: float = 30.0) -> None:
        self.verify_fraction = verify_fraction
        self.probation_tasks = probation_tasks
        self.train_fraction = train_fraction
        # A checker must have been heard from this recently: a live worker polls
        # (parked long-polls touch it every second) or heartbeats several times
        # per lease timeout, while a dead one still counts as "active" for a
        # minute, which would leave checks waiting on it.
        self.live_window_s = live_window_s
        self.db = db
        self.scheduler = scheduler
        self.metrics = metrics
        self.runs = runs
        self.reputations: dict[str, Reputation] = {}
        self._gradient_bytes: dict[str, int] = {}  # run id -> its fp32 adapter's bytes
        scheduler.hold_cost = self.hold_cost
        self._rng = random.Random(seed)
        self.primary_tasks = 0  # checkable results accepted
        self.extra_tasks = 0    # tasks issued only to check another's result

    @property
    def enabled(self) -> bool:
        return self.verify_fraction > 0

    def reputation(self, w: WorkerInfo) -> Reputation:
        rep = self.reputations.get(w.worker_id)
        if rep is None:
            rep = self.reputations[w.worker_id] = Reputation(w.worker_id, w.token_id)
        return rep

    def state(self, w: WorkerInfo) -> dict:
        """What the dashboard shows of ``w``'s reputation."""
        rep = self.reputation(w)
        return {"state": rep.state(self.probation_tasks) if self.enabled or rep.quarantined
                else "unchecked", "streak": rep.streak, "agreements": rep.agreements,
                "disagreements": rep.disagreements, "reason": rep.reason}

    def checkable(self, run: Run, kind: str) -> bool:
        """Whether results of ``run``'s tasks of ``kind`` may be checked at all."""
        if not self.enabled or kind not in CHECKED_KINDS:
            return False
        if kind == "train" and self.train_fraction == 0:
            return False
        if kind in _DROPOUT_KINDS and run.spec.lora.dropout > 0:
            self.note_skipped("dropout")
            return False
        return True

    def wants_check(self, w: WorkerInfo, kind: str) -> bool:
        """Whether ``w``'s result for a task of ``kind`` is held for a check."""
        if not self.enabled or kind not in CHECKED_KINDS:
            return False
        self.primary_tasks += 1
        self._overhead()
        if self.reputation(w).state(self.probation_tasks) == "probation":
            return True
        fraction = self.train_fraction if kind == "train" else self.verify_fraction
        return self._rng.random() < fraction

    def hold_cost(self, w: WorkerInfo, t: Task) -> int:
        """Bytes ``w``'s result for ``t`` will hold while it waits for a check: a
        gradient (the run's adapter in fp32) when ``w`` is on probation, and
        nothing otherwise (a trusted worker's result is held by chance; it is
        counted once it is)."""
        if (not self.enabled or t.keep or t.kind not in _HEAVY_KINDS
                or self.reputation(w).state(self.probation_tasks) != "probation"):
            return 0
        size = self._gradient_bytes.get(t.run_id)
        if size is None:
            run = self.runs.get(t.run_id)
            if run is None:
                return 0
            size = self._gradient_bytes[t.run_id] = 4 * sum(
                math.prod(shape) for shape in run.shapes.values())
            if size > self.scheduler.holds.limit:
                log.warning("run %s: one gradient (%d MB) is larger than --verify-memory-mb "
                            "(%d MB): workers on probation compute its shards one at a time "
                            "across the fleet; raise --verify-memory-mb to let more through",
                            t.run_id, size >> 20, self.scheduler.holds.limit >> 20)
        return size

    def is_quarantined(self, worker_id: str) -> bool:
        rep = self.reputations.get(worker_id)
        return rep is not None and rep.quarantined

    # -- who checks --------------------------------------------------------------------
    def checkers(self, run_id: str, model_id: str, exclude: set[str], token_id: str
                 ) -> tuple[set[str], bool] | None:
        """(workers to exclude from the check task, whether the check falls back to
        a worker under the same token); None when no other live worker exists."""
        others = self.live_checkers(run_id, model_id, exclude)
        if not others:
            return None
        same = {w.worker_id for w in self.scheduler.workers.values()
                if token_id and w.token_id == token_id}
        if token_id and any(w.worker_id not in same for w in others):
            return exclude | same, False
        return set(exclude), bool(token_id)

    def live_checkers(self, run_id: str, model_id: str, exclude: set[str]
                      ) -> list[WorkerInfo]:
        """Workers heard from within ``live_window_s`` that may check, outside
        ``exclude``."""
        now = time.monotonic()
        return [w for w in self.scheduler.eligible_workers(model_id, run_id)
                if w.worker_id not in exclude and not self.is_quarantined(w.worker_id)
                and now - w.last_seen < self.live_window_s]

    def note_issued(self, role: str, same_token: bool) -> None:
        self.extra_tasks += 1
        self.metrics.verify_tasks.labels(role).inc()
        if same_token:
            self.metrics.verify_same_token.inc()
            log.warning("verification by a worker under the same token: no other is live")
        self._overhead()

    def note_skipped(self, reason: str) -> None:
        self.metrics.verify_skipped.labels(reason).inc()

    def _overhead(self) -> None:
        total = self.primary_tasks + self.extra_tasks
        self.metrics.verify_overhead.set(self.extra_tasks / total if total else 0.0)

    # -- verdicts ----------------------------------------------------------------------
    async def agreed(self, *worker_ids: str) -> None:
        for wid in worker_ids:
            await self._update(wid, Reputation.agree)

    async def disagreed(self, *worker_ids: str) -> None:
        for wid in worker_ids:
            await self._update(wid, Reputation.disagree)

    async def _update(self, worker_id: str, change) -> None:
        w = self.scheduler.workers.get(worker_id)
        rep = self.reputation(w) if w else self.reputations.setdefault(
            worker_id, Reputation(worker_id))
        change(rep)
        await self.db.save_reputation(rep.to_row())

    async def quarantine(self, worker_id: str, reason: str) -> None:
        """Quarantine for good: leases released, its part of every run's open
        step taken out (its shards owed to others), its reputation stored."""
        w = self.scheduler.workers.get(worker_id)
        rep = self.reputation(w) if w else self.reputations.setdefault(
            worker_id, Reputation(worker_id))
        if rep.quarantined:
            return
        rep.quarantined, rep.reason = True, reason[:300]
        await self.db.save_reputation(rep.to_row())
        self.metrics.quarantines.labels("verification").inc()
        owed = sum(run.accum.remove_worker(worker_id) for run in self.runs.values())
        if w is not None:
            self._bar(w, reason)
        log.warning("worker quarantined by verification id=%s name=%s shards_owed=%d "
                    "reason=%r", worker_id, w.name if w else "?", owed, reason)

    def _bar(self, w: WorkerInfo, reason: str) -> None:
        w.quarantined_until = math.inf
        w.quarantine_reason = f"disagreed with other workers' recomputation: {reason}"
        self.scheduler.withdraw(w, f"worker {w.name} quarantined")  # its leases: back now

    async def restore(self) -> None:
        """Reputations from the database (at start, after the workers)."""
        for row in await self.db.reputations():
            rep = Reputation.from_row(row)
            self.reputations[rep.worker_id] = rep
            w = self.scheduler.workers.get(rep.worker_id)
            if rep.quarantined and w is not None:
                w.quarantined_until = math.inf
                w.quarantine_reason = f"disagreed with other workers' recomputation: {rep.reason}"
