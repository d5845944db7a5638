"""Combination rules for a round's deltas, as pure functions.

Every rule weighs each delta the same way (``delta_weight``: shard tokens x
staleness weight). ``weighted_mean`` streams (``StreamingMean`` keeps one
adapter-sized sum, so coordinator memory is O(adapter), not O(submissions)).
``weighted_trimmed_mean`` and ``weighted_median`` are coordinate-wise and need
every delta of the round at once: their memory is bounded by the round's task
count (``tasks_per_round``). ``trimmed_mean`` / ``coordinate_median`` are their
unweighted forms.
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
    out: Tensors = {}
    for k in deltas[0]:
        acc = deltas[0][k] * (weights[0] / total)
        for d, w in zip(deltas[1:], weights[1:], strict=True):
            acc = acc + d[k] * (w / total)
        out[k] = acc
    return out


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


def _sorted_with_weights(deltas: Sequence[Tensors], weights: Sequence[float], key: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each coordinate's values across deltas, sorted, and the weight of each."""
    sorted_, idx = torch.sort(torch.stack([d[key] for d in deltas]), dim=0)
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    return sorted_, w[idx]


def _check_weights(deltas: Sequence[Tensors], weights: Sequence[float], rule: str) -> None:
    if not deltas or len(deltas) != len(weights):
        raise ValidationError(f"{rule} needs one weight per delta, and at least one delta")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValidationError(f"{rule} needs positive finite weights")


def weighted_trimmed_mean(deltas: Sequence[Tensors], weights: Sequence[float],
                          trim_fraction: float) -> Tensors:
    """Coordinate-wise: drop the ``floor(n * trim_fraction)`` largest and smallest
    values of each coordinate (by count, so a delta cannot buy its way past the
    trim with a large weight), then take the weighted mean of the rest."""
    _check_weights(deltas, weights, "trimmed_mean")
    if not 0 <= trim_fraction < 0.5:
        raise ValidationError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = len(deltas)
    k = int(math.floor(n * trim_fraction))
    out = {}
    for key in deltas[0]:
        sorted_, w = _sorted_with_weights(deltas, weights, key)
        kept_v, kept_w = sorted_[k: n - k], w[k: n - k].to(sorted_.dtype)
        out[key] = (kept_v * kept_w).sum(dim=0) / kept_w.sum(dim=0)
    return out


def weighted_median(deltas: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Coordinate-wise weighted median: the value where the cumulative weight of
    the sorted values reaches half the total; where it lands exactly on half,
    the mean of that value and the next (so equal weights give the usual median,
    the mean of the two middle values for even n)."""
    _check_weights(deltas, weights, "median")
    n = len(deltas)
    total = float(sum(weights))
    half, tol = total / 2, 1e-9 * total
    out = {}
    for key in deltas[0]:
        sorted_, w = _sorted_with_weights(deltas, weights, key)
        cum = w.cumsum(dim=0)
        i = (cum >= half - tol).to(torch.uint8).argmax(dim=0, keepdim=True)
        j = (i + 1).clamp(max=n - 1)
        x_i, x_j = sorted_.gather(0, i).squeeze(0), sorted_.gather(0, j).squeeze(0)
        on_half = (cum.gather(0, i).squeeze(0) - half).abs() <= tol
        out[key] = torch.where(on_half, (x_i + x_j) / 2, x_i)
    return out


def trimmed_mean(deltas: Sequence[Tensors], trim_fraction: float) -> Tensors:
    """Unweighted ``weighted_trimmed_mean``."""
    if not deltas:
        raise ValidationError("trimmed_mean needs at least one delta")
    return weighted_trimmed_mean(deltas, [1.0] * len(deltas), trim_fraction)


def coordinate_median(deltas: Sequence[Tensors]) -> Tensors:
    """Coordinate-wise median (mean of the two middle values for even n)."""
    if not deltas:
        raise ValidationError("coordinate_median needs at least one delta")
    return weighted_median(deltas, [1.0] * len(deltas))


def clip_to_norm(delta: Tensors, max_norm: float) -> Tensors:
    """Scale ``delta`` down to ``max_norm`` if it is longer (norm clipping)."""
    norm = global_norm(delta)
    if norm <= max_norm or norm == 0:
        return dict(delta)
    return {k: v * (max_norm / norm) for k, v in delta.items()}


def staleness_weight(staleness: int) -> float:
    """FedBuff-style down-weighting of an accepted stale delta."""
    return 1.0 / math.sqrt(1.0 + staleness)


def delta_weight(tokens: int, staleness: int) -> float:
    """The weight of an accepted delta under every combination rule: the tokens
    of its shard (known to the coordinator, not claimed by the worker) times its
    staleness weight."""
    return tokens * staleness_weight(staleness)
