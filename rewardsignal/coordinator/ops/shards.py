"""Shards of a batch computed over the workers, with results checked by
recomputation (``coordinator.trust``) before they count.

``compute_shards`` issues one task per shard and collects the result that
counts for each: an unchecked result (its gradient already summed under its
worker), or a checked one that agreed with another worker's (summed once the
verdict is in). A shard whose worker is quarantined meanwhile, or whose check
found no majority, is issued again, to other workers, a bounded number of
times. ``settle_owed`` recomputes the shards taken out of a run's accumulator
with a quarantined worker; ``optim_step`` calls it before it steps, so no step
is applied while a shard of its batch is missing or awaiting a verdict.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass

from rewardsignal.coordinator.ops.tasks import counted_results
from rewardsignal.coordinator.runs.accumulator import Contribution, Part, PartialSums
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.scheduling.tasks import Task
from rewardsignal.coordinator.services import Services
from rewardsignal.coordinator.trust.verify import Outcome
from rewardsignal.errors import TaskFailedError

# Rounds of re-issuing shards whose result did not hold (quarantine, no majority).
_MAX_ROUNDS = 4


@dataclass(frozen=True)
class Shard:
    payload: dict
    tokens: int
    preferred_worker: str | None = None


async def compute_shards(ctx: Services, run: Run, request: Request, shards: list[Shard], *,
                         kind: str, version: int, sink: PartialSums | None) -> list[Outcome]:
    """The result that counts for each shard, in order."""
    counted: dict[int, Outcome] = {}
    todo = list(range(len(shards)))
    for attempt in range(_MAX_ROUNDS):
        await _round(ctx, run, request, shards, todo, counted, kind=kind, version=version,
                     sink=sink, first=attempt == 0)
        bad = {o.worker_id for o in counted.values() if ctx.trust.is_quarantined(o.worker_id)}
        redo = set(bad)  # with any worker whose gradients shared a bad one's sum
        for w in bad:
            if sink is not None:
                redo |= sink.drop(w)
        todo = [i for i in range(len(shards))
                if i not in counted or counted[i].worker_id in redo]
        for i in todo:
            if i in counted:
                ctx.metrics.recomputed.labels("request").inc()
            counted.pop(i, None)
        if not todo:
            return [counted[i] for i in range(len(shards))]
    raise TaskFailedError(f"{len(todo)} shard(s) of request {request.request_id} found no "
                          f"result that other workers agreed with in {_MAX_ROUNDS} rounds")


async def _round(ctx: Services, run: Run, request: Request, shards: list[Shard], todo: list[int],
                 counted: dict[int, Outcome], *, kind: str, version: int,
                 sink: PartialSums | None, first: bool) -> None:
    tasks = [ctx.scheduler.add_task(
        kind=kind, run_id=run.run_id, base_model=run.spec.base_model, version=version,
        tokens=shards[i].tokens, preferred_worker=shards[i].preferred_worker if first else None,
        sink=sink, group=run.spec.owner, payload=shards[i].payload) for i in todo]

    async def verified(t: Task, first: Outcome) -> Outcome | None:
        """``first`` checked, and summed at once if it counts (its memory is then free)."""
        got = None
        try:
            got = await ctx.verifier.check(run, t, first)
            if got is not None and sink is not None and got.tensors is not None:
                await asyncio.to_thread(sink.add, got.tensors, owned=True, worker=got.worker_id)
            return got
        finally:
            first.release()
            if got is not None:
                got.release()

    got = await counted_results(ctx, run, request, tasks, verified)
    for j, outcome in got.items():
        if outcome is not None:
            outcome.tensors = None
            counted[todo[j]] = outcome


def parts_of(shards: list[Shard], outcomes: list[Outcome], sink: PartialSums | None
             ) -> dict[str, Part]:
    """Each sum's share of a request (a worker's, or the few workers' sharing
    it): its summed gradient, weights, loss and the shards computed into it
    (what ``Accumulator.remove_worker`` owes back)."""
    parts: dict[str, Part] = defaultdict(Part)
    for shard, o in zip(shards, outcomes, strict=True):
        p = parts[sink.key_of(o.worker_id) if sink is not None else o.worker_id]
        p.workers.add(o.worker_id)
        p.weight += o.result["weight_sum"]
        p.loss_sum += o.result["loss_sum"]
        p.tokens += shard.tokens
        p.shards.append(shard.payload)
    if sink is not None:
        for key, s in sink.by_key.items():
            if not s.empty and key in parts:
                parts[key].grads = s.value()
    return dict(parts)


async def settle_owed(ctx: Services, run: Run, request: Request) -> int:
    """Recompute, on other workers, the shards taken out of the run's open step
    with a quarantined worker; how many. (In memory only: the step that follows
    makes them durable.)"""
    settled = 0
    while run.accum.owed:
        owed, run.accum.owed = run.accum.owed, []
        by_request: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for request_id, reduction, payload in owed:
            by_request[(request_id, reduction)].append(payload)
        for (request_id, reduction), payloads in by_request.items():
            shards = [Shard(p, sum(len(d["model_input"]) for d in p["datums"]))
                      for p in payloads]
            sink = PartialSums()
            outcomes = await compute_shards(ctx, run, request, shards, kind="forward_backward",
                                            version=run.version, sink=sink)
            parts = parts_of(shards, outcomes, sink)
            total = sink.total()
            if total is None:
                continue
            weight = sum(p.weight for p in parts.values())
            run.accum.add(Contribution(request_id, total, weight, reduction,
                                       sum(p.tokens for p in parts.values()),
                                       sum(p.loss_sum for p in parts.values()), weight, parts))
            settled += len(shards)
            ctx.metrics.recomputed.labels("step").inc(len(shards))
    return settled
