"""Flat tensor sets: whole-set arithmetic on the one buffer gives the bits of the
same arithmetic tensor by tensor, and a set whose entries change stops being flat."""

from __future__ import annotations

import pytest
import torch

from rewardsignal.aggregation.tensors import (
    FlatTensors,
    all_finite,
    global_norm,
    l2_norm,
    tree_add_,
    tree_clone,
    tree_div,
)
from rewardsignal.coordinator.runs.accumulator import Accumulator, Contribution
from rewardsignal.protocol import tensors_from_bytes, tensors_to_bytes


def _plain(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.lora_{ab}": torch.randn(4, 6 if ab == "A" else 4, generator=g)
            for i in range(5) for ab in "AB"}


def _flat(seed: int) -> FlatTensors:
    out = tensors_from_bytes(tensors_to_bytes(_plain(seed)))
    assert isinstance(out, FlatTensors) and out.flat is not None
    return out


def _bits_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_whole_set_arithmetic_has_the_bits_of_the_per_tensor_loop():
    flat, plain = tree_clone(_flat(0)), _plain(0)
    assert isinstance(flat, FlatTensors) and flat.flat is not None
    for seed in (1, 2, 3):
        tree_add_(flat, _flat(seed))
        tree_add_(plain, _plain(seed))
    assert _bits_equal(flat, plain)
    assert _bits_equal(tree_div(flat, 7.0), tree_div(plain, 7.0))
    assert isinstance(tree_div(flat, 7.0), FlatTensors)
    assert l2_norm(flat) == pytest.approx(global_norm(plain), rel=1e-6)
    # The accumulator fed flat submissions steps on the same bits as fed plain ones.
    accs = [Accumulator(), Accumulator()]
    for seed in (4, 5):
        for acc, grads in zip(accs, (_flat(seed), _plain(seed)), strict=True):
            acc.add(Contribution(f"req-{seed}", grads, 3.0 + seed, "mean", 10, 1.0, 3.0))
    assert _bits_equal(accs[0].gradient(), accs[1].gradient())


def test_a_set_whose_entries_change_is_no_longer_flat():
    for change in (lambda t: t.__setitem__("extra", torch.zeros(2)),
                   lambda t: t.pop("layer0.lora_A"),
                   lambda t: t.popitem(),
                   lambda t: t.clear(),
                   lambda t: t.update({"layer0.lora_A": torch.zeros(4, 6)}),
                   lambda t: t.setdefault("extra", torch.zeros(2)),
                   lambda t: t.__delitem__("layer0.lora_A"),
                   lambda t: t.__ior__({"extra": torch.zeros(2)})):
        t = _flat(0)
        change(t)
        assert t.flat is None
    # A replaced entry is no longer a view of the buffer: adding the set into
    # another must take it tensor by tensor, replaced entry included.
    t = _flat(0)
    t["layer0.lora_A"] = torch.ones(4, 6)
    other = _flat(1)
    want = {k: other[k] + t[k] for k in other}
    tree_add_(other, t)
    assert _bits_equal(other, want)
    # Same names in another order: not the same layout, so added per tensor.
    a, b = _flat(0), _flat(1)
    shuffled = FlatTensors(torch.cat([b[k].reshape(-1) for k in reversed(b)]),
                           tuple((k, tuple(b[k].shape)) for k in reversed(b)))
    want = {k: a[k] + b[k] for k in a}
    tree_add_(a, shuffled)
    assert _bits_equal(a, want)


def test_all_finite_names_the_first_bad_tensor():
    t = _flat(0)
    assert all_finite(t) is None
    t["layer3.lora_B"][1, 2] = float("nan")  # a value, not an entry: still flat
    assert t.flat is not None and all_finite(t) == "layer3.lora_B"
    assert all_finite({"x": torch.tensor([1.0, float("inf")])}) == "x"
