"""Combination rules for a round's deltas, as pure functions.

``weighted_mean`` streams (``StreamingMean`` keeps one adapter-sized sum, so
coordinator memory is O(adapter), not O(submissions)). ``trimmed_mean`` and
``coordinate_median`` are coordinate-wise and need every delta of the round at
once: their memory is bounded by the round's task count (``tasks_per_round``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rewardsignal.aggregation.tensors import Tensors, global_norm
from rewardsignal.errors import ValidationError

AGGREGATORS = ("mean", "trimmed_mean", "median")


def weighted_mean(deltas: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    if not deltas or len(deltas) != len(weights):
        raise ValidationError("weighted_mean needs one weight per delta, and at least one delta")
    total = float(sum(weights))
    if total <= 0:
        raise ValidationError("weights must sum to a positive number")
    return {k: sum(d[k] * (w / total) for d, w in zip(deltas, weights, strict=True))
            for k in deltas[0]}


class StreamingMean:
    """Running weighted sum; ``value()`` is the weighted mean so far."""

    def __init__(self) -> None:
        self._sum: Tensors | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Tensors, weight: float) -> None:
        if weight <= 0:
            raise ValidationError("weight must be positive")
        if self._sum is None:
            self._sum = {k: v * weight for k, v in delta.items()}
        else:
            for k, v in delta.items():
                self._sum[k].add_(v, alpha=weight)
        self.total_weight += weight
        self.count += 1

    def value(self) -> Tensors:
        if self._sum is None:
            raise ValidationError("no deltas to average")
        return {k: v / self.total_weight for k, v in self._sum.items()}


def _stacked(deltas: Sequence[Tensors], key: str) -> torch.Tensor:
    return torch.stack([d[key] for d in deltas])


def trimmed_mean(deltas: Sequence[Tensors], trim_fraction: float) -> Tensors:
    """Coordinate-wise: drop the ``floor(n * trim_fraction)`` largest and smallest
    values of each coordinate, average the rest."""
    if not deltas:
        raise ValidationError("trimmed_mean needs at least one delta")
    if not 0 <= trim_fraction < 0.5:
        raise ValidationError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = len(deltas)
    k = int(math.floor(n * trim_fraction))
    out = {}
    for key in deltas[0]:
        sorted_, _ = torch.sort(_stacked(deltas, key), dim=0)
        out[key] = sorted_[k: n - k].mean(dim=0)
    return out


def coordinate_median(deltas: Sequence[Tensors]) -> Tensors:
    """Coordinate-wise median (mean of the two middle values for even n)."""
    if not deltas:
        raise ValidationError("coordinate_median needs at least one delta")
    out = {}
    for key in deltas[0]:
        stacked = _stacked(deltas, key)
        n = stacked.shape[0]
        sorted_, _ = torch.sort(stacked, dim=0)
        out[key] = sorted_[n // 2] if n % 2 else (sorted_[n // 2 - 1] + sorted_[n // 2]) / 2
    return out


def clip_to_norm(delta: Tensors, max_norm: float) -> Tensors:
    """Scale ``delta`` down to ``max_norm`` if it is longer (norm clipping)."""
    norm = global_norm(delta)
    if norm <= max_norm or norm == 0:
        return dict(delta)
    return {k: v * (max_norm / norm) for k, v in delta.items()}


def staleness_weight(staleness: int) -> float:
    """FedBuff-style down-weighting of an accepted stale delta."""
    return 1.0 / math.sqrt(1.0 + staleness)
