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
        t, plain = _flat(0), _plain(0)
        change(t)
        change(plain)
        assert t.flat is None
        # The same entries as a plain dict given the same change (the views
        # were made before it: nothing it did not touch is lost).
        assert list(t) == list(plain) and len(t) == len(plain)
        assert _bits_equal(t, plain)
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


def _viewless(t: FlatTensors) -> bool:
    """Whether ``t``'s per-tensor views are still unmade (its storage is empty)."""
    return dict.__len__(t) == 0 and len(t) > 0


def test_a_set_reads_as_the_dict_it_describes_and_makes_its_views_once_read():
    plain = _plain(0)
    reads = {
        "items": lambda t: dict(t.items()), "values": lambda t: dict(zip(list(t), t.values(), strict=True)),
        "getitem": lambda t: {k: t[k] for k in t}, "get": lambda t: {k: t.get(k) for k in t},
        "dict": dict, "unpack": lambda t: {**t}, "copy": lambda t: t.copy(),
        "or": lambda t: t | {}, "ror": lambda t: {} | t,
        "update into": lambda t: (d := {}, d.update(t))[0],
    }
    for name, read in reads.items():
        t = _flat(0)
        assert _viewless(t)
        assert list(t) == list(plain) and len(t) == len(plain) and bool(t), name
        assert _viewless(t), name  # names and length come from the layout
        assert _bits_equal(read(t), plain), name
        assert dict.__len__(t) == len(plain), name
    t = _flat(0)
    assert "layer0.lora_A" in t and "nope" not in t and t.get("nope") is None
    assert list(reversed(t)) == list(reversed(plain))
    assert repr(t) == repr(plain)
    assert FlatTensors(torch.zeros(0), ()) == {} and not FlatTensors(torch.zeros(0), ())


def test_copies_and_pickles_of_a_set_are_flat_sets_of_their_own():
    import copy
    import pickle

    for made in (False, True):
        t = _flat(0)
        if made:
            t.values()
        for twin in (pickle.loads(pickle.dumps(t)), copy.deepcopy(t)):
            assert isinstance(twin, FlatTensors) and twin.flat is not None
            assert _bits_equal(twin, _plain(0))
            twin.flat.zero_()  # its own buffer, its views follow it
            assert float(twin["layer1.lora_B"].abs().sum()) == 0.0
            assert _bits_equal(t, _plain(0))
    t = _flat(0)
    t["extra"] = torch.ones(2)  # no longer flat: copied as the dict it is
    twin = copy.deepcopy(t)
    assert type(twin) is dict and _bits_equal(twin, t)


def test_whole_set_work_never_makes_the_views():
    from rewardsignal.aggregation.codecs import decode, encode
    from rewardsignal.aggregation.optim import AdamWConfig, adamw_step
    from rewardsignal.aggregation.validate import UpdateLimits, validate_update
    from rewardsignal.coordinator.ingest.accept import tensor_bytes

    shapes = {k: tuple(v.shape) for k, v in _plain(0).items()}
    g = decode(_flat(1), "fp32")
    validate_update(g, weight=2.0, expected_shapes=shapes, task_version=0, current_version=0,
                    limits=UpdateLimits())
    assert tensor_bytes(g) == 4 * sum(v.numel() for v in _plain(1).values())
    params, state, step = adamw_step(tree_clone(_flat(0)), g, {}, 0, AdamWConfig())
    params, state, step = adamw_step(params, tree_div(g, 3.0), state, step, AdamWConfig())
    sent = tensors_to_bytes(encode(params, "fp32"))
    for t in (g, params, state):
        assert _viewless(t)
    assert _bits_equal(tensors_from_bytes(sent), params)


def test_a_set_changed_while_it_is_walked_says_so_as_a_dict_does():
    t = _flat(0)
    with pytest.raises(RuntimeError, match="changed"):
        for name in t:
            t[name + ".copy"] = torch.zeros(1)


def test_threads_reading_a_new_set_at_once_all_see_all_of_it():
    """Its views are made by whichever thread reads first, while the others
    read: none of them sees a part of the set (they release the interpreter
    lock as they are made)."""
    import sys
    import threading

    layout = tuple((f"t{i:04d}", (4, 4)) for i in range(400))
    reads = (len, lambda t: len(list(t.items())), lambda t: len(set(t)),
             lambda t: sum(1 for k in t if t[k].shape == (4, 4)), lambda t: len(t.values()))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        for _ in range(40):
            t = FlatTensors(torch.zeros(400 * 16), layout)
            seen: list[int] = []
            start = threading.Barrier(len(reads))

            def read(fn, t=t, seen=seen, start=start):
                start.wait()
                seen.append(fn(t))

            threads = [threading.Thread(target=read, args=(fn,)) for fn in reads]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert seen == [400] * len(reads)
    finally:
        sys.setswitchinterval(interval)
