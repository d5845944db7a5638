"""The verification of one result by recomputation: a second worker computes
the same task at the same version; if the two disagree beyond the tolerance of
their compute dtypes a third breaks the tie, and the worker in the minority is
quarantined. Returns the result that counts, or None when the shard has to be
computed again (no majority). ``forward_backward``/``forward`` results compare
gradients, loss sums and logprobs; federated ``train`` results compare their
deltas (same shard, seed and local steps) under the looser train bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rewardsignal.aggregation.agreement import (
    Result,
    delta_disagreement,
    disagreement,
    tolerance,
    train_tolerance,
)
from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.scheduling.holds import Hold, release
from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.scheduling.tasks import Task
from rewardsignal.coordinator.trust.service import Trust

# How often a waiting check looks for a worker that may compute it.
_CHECK_S = 1.0


@dataclass
class Outcome:
    """One worker's accepted result for a shard (``tensors``: its gradient, held
    while the result is checked, or a ``train`` task's delta; ``hold``: the
    memory it is counted as while held, released once it is summed or dropped)."""

    worker_id: str
    result: dict[str, Any]
    tensors: Tensors | None = field(default=None, repr=False)
    hold: Hold | None = field(default=None, repr=False)

    def release(self) -> None:
        """The held tensors are summed or dropped: their memory is free."""
        self.tensors = None
        release(self.hold)
        self.hold = None

    def comparable(self) -> Result:
        r = self.result
        return Result(r["loss_sum"], r["weight_sum"], r["logprobs"], self.tensors)


@dataclass
class Verifier:
    trust: Trust
    scheduler: Scheduler

    def _dtype(self, run: Run, worker_id: str) -> str:
        w = self.scheduler.workers.get(worker_id)
        return run.spec.precision.resolve(w.auto_dtype if w else "bf16")

    def tolerance_for(self, run: Run, a: str, b: str) -> float:
        return tolerance(self._dtype(run, a), self._dtype(run, b),
                         quantized=run.spec.precision.quantization is not None)

    def compare(self, run: Run, task: Task, a: Outcome, b: Outcome) -> str | None:
        """Why ``a`` and ``b`` (two workers' results for ``task``) disagree; None
        when they agree within the bound of the two workers' dtypes."""
        if task.kind == "train":
            if a.tensors is None or b.tensors is None:
                return "a train result without its delta"
            tol = train_tolerance(self._dtype(run, a.worker_id), self._dtype(run, b.worker_id),
                                  quantized=run.spec.precision.quantization is not None,
                                  codec=str(task.payload.get("codec", "fp32")))
            return delta_disagreement(a.tensors, b.tensors, tol)
        return disagreement(a.comparable(), b.comparable(),
                            self.tolerance_for(run, a.worker_id, b.worker_id))

    async def check(self, run: Run, task: Task, first: Outcome, *,
                    compare: Callable[[Outcome, Outcome], str | None] | None = None,
                    kind: str | None = None, payload: dict | None = None,
                    barred: frozenset[str] = frozenset(), what: str = "task"
                    ) -> Outcome | None:
        """Check ``first`` (the accepted result of ``task``); the result that
        counts (``first``, or the one a third worker sided with), or None when
        the shard must be computed again. By default the checkers compute the
        same task and ``Verifier.compare`` judges; a check of another form (a
        sample's, ``sample_check``) names the ``kind`` and ``payload`` the
        checkers compute, the workers ``barred`` from it, its ``compare``, and
        ``what`` the quarantine reason calls the checked result."""
        if compare is None:
            def compare(a: Outcome, b: Outcome) -> str | None:
                return self.compare(run, task, a, b)
        second = await self.recompute(run, task, first.worker_id, {first.worker_id} | barred,
                                      "second", kind=kind, payload=payload)
        if second is None:
            return first  # nobody else can check it: counts unchecked
        third: Outcome | None = None
        counts: Outcome | None = None
        try:
            why = compare(first, second)
            if why is None:
                self.trust.metrics.verdicts.labels("agree").inc()
                await self.trust.agreed(first.worker_id, second.worker_id)
                counts = first
                return counts
            third = await self.recompute(run, task, first.worker_id,
                                         {first.worker_id, second.worker_id} | barred,
                                         "tiebreak", kind=kind, payload=payload)
            if third is None:
                # Two results, no majority: neither counts, both back on probation.
                self.trust.metrics.verdicts.labels("unresolved").inc()
                await self.trust.disagreed(first.worker_id, second.worker_id)
                return None
            counts = await self._tiebreak(run, compare, first, second, third,
                                          f"{what} of run {run.run_id}: {why}")
            return counts
        finally:  # the checkers' gradients, unless one counts (the caller's then)
            for o in (second, third):
                if o is not None and o is not counts:
                    o.release()

    async def _tiebreak(self, run: Run, compare: Callable[[Outcome, Outcome], str | None],
                        a: Outcome, b: Outcome, c: Outcome, why: str) -> Outcome | None:
        with_a = compare(a, c) is None
        with_b = compare(b, c) is None
        if with_a == with_b:
            # The third agrees with both (a borderline pair) or with neither: no
            # one is singled out; all three go back on probation, the shard is redone.
            self.trust.metrics.verdicts.labels("unresolved").inc()
            await self.trust.disagreed(a.worker_id, b.worker_id, c.worker_id)
            return None
        good, bad = (a, b) if with_a else (b, a)
        self.trust.metrics.verdicts.labels("first_wrong" if bad is a else "checker_wrong").inc()
        await self.trust.agreed(good.worker_id, c.worker_id)
        await self.trust.disagreed(bad.worker_id)
        await self.trust.quarantine(bad.worker_id, f"{why}; a third worker sided with the other")
        return good

    async def recompute(self, run: Run, task: Task, origin: str, exclude: set[str],
                         role: str, *, kind: str | None = None, payload: dict | None = None
                         ) -> Outcome | None:
        """The same task (or ``kind`` with ``payload`` at its version) computed by a
        worker outside ``exclude`` (and, when one is live, under another token
        than ``origin``'s); None when none is live."""
        w = self.scheduler.workers.get(origin)
        picked = self.trust.checkers(run.run_id, task.base_model, exclude,
                                     w.token_id if w else "")
        if picked is None:
            self.trust.note_skipped("no_other_worker")
            return None
        barred, same_token = picked
        self.trust.note_issued(role, same_token)
        copy = self.scheduler.add_task(
            kind=kind or task.kind, run_id=task.run_id, base_model=task.base_model,
            version=task.version, payload=payload or task.payload, tokens=task.tokens,
            group=task.group, exclude=frozenset(barred), job_id=task.job_id,
            limits=task.limits, keep=True)
        try:
            if not await self._wait(copy, run, barred):
                self.trust.note_skipped("no_other_worker")
                return None
            res = copy.future.result()
            # A train task's delta travels on its result; a gradient is held on the task.
            if copy.kind == "train":
                return Outcome(copy.done_by, res, res.pop("delta", None))
            out = Outcome(copy.done_by, res, copy.held, copy.hold)
            copy.hold = None
            return out
        finally:
            if not copy.done:
                self.scheduler.cancel(copy, "check withdrawn")
            release(copy.hold)
            copy.held = copy.hold = None

    async def _wait(self, copy: Task, run: Run, barred: set[str]) -> bool:
        """Whether ``copy`` was computed; False once no worker that may compute
        it has been heard from for ``live_window_s`` (it died, or left)."""
        idle_since: float | None = None
        while True:
            done, _ = await asyncio.wait({copy.future}, timeout=_CHECK_S)
            if done:
                copy.future.result()  # a failed check task fails the request
                return True
            if copy.leases or self.trust.live_checkers(run.run_id, run.spec.base_model,
                                                       barred):
                idle_since = None
                continue
            now = time.monotonic()
            idle_since = idle_since or now
            if now - idle_since >= self.trust.live_window_s:
                return False
