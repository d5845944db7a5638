"""The accumulator against a hand-written reference: the step's gradient is the
mean-reduced parts divided by their total weight plus the sum-reduced parts,
whatever the order or grouping in which contributions arrive."""

from __future__ import annotations

import pytest
import torch

from rewardsignal.coordinator.runs.accumulator import (
    MAX_SUMS,
    Accumulator,
    Contribution,
    GradientSum,
    Part,
    PartialSums,
)
from rewardsignal.errors import ValidationError


def _grads(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}


def _c(i: int, weight: float, reduction: str = "mean", tokens: int = 7) -> Contribution:
    return Contribution(f"req-{i}", _grads(i), weight, reduction, tokens, loss_sum=2.0 * i,
                        loss_weight=weight)


def test_gradient_is_weighted_mean_plus_sums():
    parts = [_c(1, 3.0), _c(2, 5.0), _c(3, 0.0, "sum"), _c(4, 2.0)]
    acc = Accumulator()
    for c in parts:
        acc.add(c)
    means = [c for c in parts if c.reduction == "mean"]
    total = sum(c.weight for c in means)
    for k in ("a", "b"):
        want = sum(c.grads[k] for c in means) / total + parts[2].grads[k]
        torch.testing.assert_close(acc.gradient()[k], want, rtol=1e-6, atol=1e-7)
    assert (acc.calls, acc.tokens) == (4, 28)
    assert acc.loss == pytest.approx((2 + 4 + 6 + 8) / 10.0)


def test_order_of_contributions_does_not_matter():
    parts = [_c(i, float(i)) for i in range(1, 6)]
    forward, backward = Accumulator(), Accumulator()
    for c in parts:
        forward.add(c)
    for c in reversed(parts):
        backward.add(c)
    for k, v in forward.gradient().items():
        torch.testing.assert_close(v, backward.gradient()[k], rtol=1e-6, atol=1e-7)


def test_contributions_are_not_mutated():
    c1, c2 = _c(1, 1.0), _c(2, 1.0)
    before = {k: v.clone() for k, v in c1.grads.items()}
    acc = Accumulator()
    acc.add(c1)
    acc.add(c2)
    assert all(torch.equal(c1.grads[k], before[k]) for k in before)


def test_gradient_sum_owned_buffer_and_copy():
    mine, theirs = _grads(1), _grads(2)
    owned = GradientSum()
    owned.add(mine, owned=True)
    owned.add(theirs)
    assert owned.value() is mine  # handed over: summed in place, no copy
    torch.testing.assert_close(mine["a"], _grads(1)["a"] + theirs["a"])
    copied = GradientSum()
    original = _grads(3)
    copied.add(original)
    assert copied.value() is original  # one addend: held as it is, not copied
    copied.add(_grads(4))  # copied before the first add
    assert torch.equal(original["a"], _grads(3)["a"])
    torch.testing.assert_close(copied.value()["a"], _grads(3)["a"] + _grads(4)["a"])


def test_empty_and_zero_weight_are_clear_errors():
    acc = Accumulator()
    assert acc.empty and acc.loss is None
    with pytest.raises(ValidationError):
        GradientSum().value()
    acc.add(_c(1, 0.0))
    assert not acc.empty
    with pytest.raises(ValidationError, match="no loss weight"):
        acc.gradient()


def _parts(seed: int, workers: tuple[str, ...]) -> dict[str, Part]:
    return {w: Part(_grads(seed * 10 + i), weight=1.0 + i, tokens=3, loss_sum=0.5 * (i + 1),
                    shards=[{"shard": f"{seed}-{w}"}]) for i, w in enumerate(workers)}


def _with_parts(i: int, parts: dict[str, Part], reduction: str = "mean") -> Contribution:
    total = {k: sum(p.grads[k] for p in parts.values()) for k in ("a", "b")}
    weight = sum(p.weight for p in parts.values())
    return Contribution(f"req-{i}", total, weight, reduction, 3 * len(parts),
                        sum(p.loss_sum for p in parts.values()), weight, parts)


def test_removing_a_worker_leaves_exactly_the_others_sum():
    # Prepare: two requests computed by three workers; the same without "w2".
    everyone, honest = Accumulator(), Accumulator()
    for i, red in ((1, "mean"), (2, "sum")):
        parts = _parts(i, ("w1", "w2", "w3"))
        everyone.add(_with_parts(i, parts, red))
        honest.add(_with_parts(i, {w: p for w, p in parts.items() if w != "w2"}, red))
    # Execute
    owed = everyone.remove_worker("w2")
    # Assert: bit-for-bit what the honest workers alone sum to, and w2's shards owed.
    for k, v in honest.gradient().items():
        assert torch.equal(everyone.gradient()[k], v)
    assert everyone.loss == honest.loss and everyone.tokens == honest.tokens
    assert owed == 2
    assert [(r, red, p["shard"]) for r, red, p in everyone.owed] == [
        ("req-1", "mean", "1-w2"), ("req-2", "sum", "2-w2")]
    assert everyone.remove_worker("w2") == 0  # a second removal finds nothing


def test_partial_sums_keep_workers_apart():
    sums = PartialSums()
    sums.add(_grads(1), worker="a")
    sums.add(_grads(2), worker="b")
    sums.add(_grads(3), worker="a")
    sums.drop("b")
    for k in ("a", "b"):
        assert torch.equal(sums.total()[k], _grads(1)[k] + _grads(3)[k])
    sums.drop("a")
    assert sums.total() is None


def _close(a: dict, b: dict) -> None:
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_many_workers_share_at_most_max_sums_and_one_taken_out_takes_its_mates():
    # Prepare: a request computed by 3 x MAX_SUMS workers, one shard each.
    workers = [f"w{i:02d}" for i in range(3 * MAX_SUMS)]
    sums = PartialSums()
    for i, w in enumerate(workers):
        sums.add(_grads(i), worker=w)
    assert len(sums.by_key) == MAX_SUMS  # memory stays bounded
    _close(sums.total(), {k: sum(_grads(i)[k] for i in range(len(workers))) for k in "ab"})
    # Execute: a worker beyond the first MAX_SUMS is taken out.
    bad = workers[-1]
    redo = sums.drop(bad)
    # Assert: its sum-mates come back to be computed again, and what is left is
    # the others' gradients (the dropped sum's are gone, nothing subtracted).
    assert bad in redo and len(redo) >= 2
    assert sums.key_of(bad) == bad  # nothing of it is held any more
    kept = [i for i, w in enumerate(workers) if w not in redo]
    _close(sums.total(), {k: sum(_grads(i)[k] for i in kept) for k in "ab"})


def test_an_accumulator_of_many_workers_owes_every_shard_of_the_sum_a_bad_one_shared():
    # Prepare: two requests over 3 x MAX_SUMS workers (each its own part, as a
    # request of that many shards makes them), and the same without one of them.
    workers = tuple(f"w{i:02d}" for i in range(3 * MAX_SUMS))
    acc = Accumulator()
    for i in (1, 2):
        acc.add(_with_parts(i, _parts(i, workers)))
    assert len(acc.workers) == MAX_SUMS
    # Execute
    owed = acc.remove_worker(workers[-1])
    # Assert: every shard of each sum it was in is owed (its own among them),
    # and the gradient left is exactly the sums nobody bad was in.
    owed_shards = {p["shard"] for _, _, p in acc.owed}
    assert owed == len(owed_shards) >= 4 and {"1-w23", "2-w23"} <= owed_shards
    left = Accumulator()
    for i in (1, 2):
        left.add(_with_parts(i, {w: p for w, p in _parts(i, workers).items()
                                 if f"{i}-{w}" not in owed_shards}))
    _close(acc.gradient(), left.gradient())
    assert acc.remove_worker(workers[-1]) == 0


def test_a_gradient_recovered_after_a_restart_is_never_taken_out_with_a_worker():
    # Prepare: a gradient recovered from disk (no shards to compute again), then
    # a request over 3 x MAX_SUMS workers, so that later workers share sums.
    workers = tuple(f"x{i:02d}" for i in range(3 * MAX_SUMS))
    acc = Accumulator()
    acc.add(Contribution("req-0", _grads(99), 1.0, "sum", 3, 0.5, 1.0))  # recovered
    acc.add(_with_parts(1, _parts(1, workers), "sum"))
    # Execute: every worker is taken out.
    for w in workers:
        acc.remove_worker(w)
    # Assert: the recovered gradient is all that is left, and every live shard is owed.
    for k, v in _grads(99).items():
        assert torch.equal(acc.gradient()[k], v)
    assert sorted(p["shard"] for _, _, p in acc.owed) == sorted(f"1-{w}" for w in workers)
