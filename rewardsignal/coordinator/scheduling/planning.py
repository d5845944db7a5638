"""Splitting a batch into shards over the workers that can take them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rewardsignal.coordinator.scheduling.workers import WorkerInfo
from rewardsignal.data.sharding import shard_by_token_budget, split_by_shares
from rewardsignal.data.types import Datum


def plan_shards(datums: list[Datum], workers: Sequence[WorkerInfo], default_task_tokens: int,
                task_tokens: Callable[[WorkerInfo], int | None] = lambda w: None
                ) -> list[tuple[list[int], str | None]]:
    """Split a batch so each eligible worker gets a share proportional to its
    measured throughput, cut further to its declared task size and to what its
    memory holds of this run (``task_tokens``; None: no bound). With no worker
    yet, shards of ``default_task_tokens`` go to whoever comes first."""
    if not workers:
        return [(s, None) for s in shard_by_token_budget(datums, default_task_tokens)]
    known = [w.tokens_per_s for w in workers if w.tokens_per_s]
    fallback = sorted(known)[len(known) // 2] if known else 1.0
    shares = [w.tokens_per_s or fallback for w in workers]
    plan: list[tuple[list[int], str | None]] = []
    parts = split_by_shares(datums, shares)
    for w, part in zip(workers, parts, strict=False):
        sub = [datums[i] for i in part]
        fits = task_tokens(w)
        budget = w.max_tokens_per_task if fits is None else min(w.max_tokens_per_task, fits)
        for shard in shard_by_token_budget(sub, budget):
            plan.append(([part[i] for i in shard], w.worker_id))
    return plan
