"""Combination rules as small strategy classes over the pure functions in
``rewardsignal.aggregation.combine``: each takes a round's accepted deltas with
their weights (the same ``delta_weight`` for every rule) and combines them."""

from __future__ import annotations

from abc import ABC, abstractmethod

from rewardsignal.aggregation.combine import (
    StreamingMean,
    weighted_median,
    weighted_trimmed_mean,
)
from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.errors import ValidationError


class Strategy(ABC):
    @abstractmethod
    def add(self, delta: Tensors, weight: float) -> None: ...

    @abstractmethod
    def combine(self) -> Tensors: ...

    @abstractmethod
    def empty(self) -> Strategy:
        """A new strategy of the same rule with nothing added."""


class WeightedMean(Strategy):
    """Streams: one adapter-sized sum, whatever the number of deltas."""

    def __init__(self) -> None:
        self._mean = StreamingMean()

    def add(self, delta: Tensors, weight: float) -> None:
        self._mean.add(delta, weight)

    def combine(self) -> Tensors:
        return self._mean.value()

    def empty(self) -> Strategy:
        return WeightedMean()


class TrimmedMean(Strategy):
    """Keeps every delta of the round (bounded by ``tasks_per_round``)."""

    def __init__(self, trim_fraction: float) -> None:
        self.trim_fraction = trim_fraction
        self.deltas: list[Tensors] = []
        self.weights: list[float] = []

    def add(self, delta: Tensors, weight: float) -> None:
        self.deltas.append(delta)
        self.weights.append(weight)

    def combine(self) -> Tensors:
        return weighted_trimmed_mean(self.deltas, self.weights, self.trim_fraction)

    def empty(self) -> Strategy:
        return TrimmedMean(self.trim_fraction)


class Median(TrimmedMean):
    def __init__(self) -> None:
        super().__init__(0.0)

    def combine(self) -> Tensors:
        return weighted_median(self.deltas, self.weights)

    def empty(self) -> Strategy:
        return Median()


def make_strategy(aggregator: str, trim_fraction: float) -> Strategy:
    if aggregator == "mean":
        return WeightedMean()
    if aggregator == "trimmed_mean":
        return TrimmedMean(trim_fraction)
    if aggregator == "median":
        return Median()
    raise ValidationError(f"unknown aggregator {aggregator!r}")
