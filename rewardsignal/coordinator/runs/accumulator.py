"""Gradients summed between steps: one running-sum type, used twice.

A ``GradientSum`` adds tensors into one adapter-sized buffer (thread-safe: shard
gradients arrive from submission threads). A ``forward_backward`` request sums
its shards into one; once the request's sum is durable it becomes a
``Contribution`` and the run's ``Accumulator`` adds it. At ``optim_step`` the
accumulator divides the ``mean`` part by its total weight and adds the ``sum``
part: exactly the gradient of the whole accumulated batch (DESIGN.md's rule).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.errors import ValidationError


class GradientSum:
    """Running sum of tensors with the same names and shapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sum: Tensors | None = None

    def add(self, tensors: Tensors, *, owned: bool = False) -> None:
        """Add ``tensors``. With ``owned`` the first addend becomes the buffer
        (the caller hands it over, e.g. a freshly decoded submission); otherwise
        it is copied so the caller's tensors are never mutated."""
        with self._lock:
            if self._sum is None:
                self._sum = tensors if owned else {k: v.clone() for k, v in tensors.items()}
            else:
                for k, v in tensors.items():
                    self._sum[k].add_(v)

    @property
    def empty(self) -> bool:
        return self._sum is None

    def value(self) -> Tensors:
        if self._sum is None:
            raise ValidationError("no gradient has been added")
        return self._sum


@dataclass(frozen=True)
class Contribution:
    """One accepted ``forward_backward``: its summed gradient and bookkeeping."""

    request_id: str
    grads: Tensors = field(repr=False)
    weight: float        # sum of |token weights| (the mean's denominator)
    reduction: str       # "mean" | "sum"
    tokens: int
    loss_sum: float
    loss_weight: float


@dataclass
class Accumulator:
    mean: GradientSum = field(default_factory=GradientSum)
    weight_mean: float = 0.0
    sum: GradientSum = field(default_factory=GradientSum)
    calls: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    loss_weight: float = 0.0

    def add(self, c: Contribution) -> None:
        """The one place a contribution is counted (live path and recovery)."""
        if c.reduction == "mean":
            self.mean.add(c.grads)
            self.weight_mean += c.weight
        else:
            self.sum.add(c.grads)
        self.calls += 1
        self.tokens += c.tokens
        self.loss_sum += c.loss_sum
        self.loss_weight += c.loss_weight

    @property
    def empty(self) -> bool:
        return self.mean.empty and self.sum.empty

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.loss_weight if self.loss_weight else None

    def gradient(self) -> Tensors:
        parts = []
        if not self.mean.empty and self.weight_mean != 0:
            parts.append({k: v / self.weight_mean for k, v in self.mean.value().items()})
        if not self.sum.empty:
            parts.append(self.sum.value())
        if not parts:
            raise ValidationError("the accumulated batches carry no loss weight (every token "
                                  "weight is 0), so there is no gradient to step on")
        out = parts[0]
        for p in parts[1:]:
            out = {k: out[k] + p[k] for k in out}
        return out
