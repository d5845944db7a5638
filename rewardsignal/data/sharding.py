"""Splitting datums into shards by token budget and by worker share."""

from __future__ import annotations

from collections.abc import Sequence

from rewardsignal.data.types import Datum
from rewardsignal.errors import ValidationError


def shard_by_token_budget(datums: Sequence[Datum], max_tokens: int) -> list[list[int]]:
    """Greedy, order-preserving packing of datum indices into shards of at most
    ``max_tokens`` tokens. A datum longer than the budget gets a shard of its own
    (callers truncate first if that must not happen)."""
    if max_tokens <= 0:
        raise ValidationError(f"max_tokens must be positive, got {max_tokens}")
    shards: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, d in enumerate(datums):
        if current and used + len(d) > max_tokens:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += len(d)
    if current:
        shards.append(current)
    return shards


def split_by_shares(datums: Sequence[Datum], shares: Sequence[float]) -> list[list[int]]:
    """Order-preserving split of datum indices into ``len(shares)`` contiguous
    parts whose token counts are as close as possible to the given fractions
    (e.g. measured tokens/s of each worker). Empty parts are dropped."""
    if not shares or any(s <= 0 for s in shares):
        raise ValidationError("shares must be a non-empty list of positive numbers")
    total_tokens = sum(len(d) for d in datums)
    total_share = float(sum(shares))
    bounds: list[float] = []
    acc = 0.0
    for s in shares[:-1]:
        acc += s / total_share
        bounds.append(acc * total_tokens)
    parts: list[list[int]] = [[] for _ in shares]
    part, seen = 0, 0
    for i, d in enumerate(datums):
        mid = seen + len(d) / 2  # a datum goes to the part its midpoint falls in
        while part < len(bounds) and mid > bounds[part]:
            part += 1
        parts[part].append(i)
        seen += len(d)
    return [p for p in parts if p]
