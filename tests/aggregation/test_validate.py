import math

import pytest
import torch

from rewardsignal.aggregation.codecs import decode, encode
from rewardsignal.aggregation.tensors import global_norm
from rewardsignal.aggregation.validate import UpdateLimits, check_fingerprint, validate_update
from rewardsignal.errors import RejectedUpdate
from rewardsignal.protocol import tensors_from_bytes, tensors_to_bytes

SHAPES = {"a": (2, 3), "b": (4,)}


def _update(v=0.5):
    return {"a": torch.full((2, 3), v), "b": torch.full((4,), v)}


def _check(update, fingerprint="fp", **kw):
    """What a submission goes through: the message's fingerprint, then the tensors."""
    args = dict(weight=2.0, expected_shapes=SHAPES, task_version=3, current_version=3,
                limits=UpdateLimits())
    args.update(kw)
    check_fingerprint(fingerprint, "fp")
    return validate_update(update, **args)


def test_valid_update_reports_staleness_and_norm():
    staleness, norm = _check(_update(), current_version=5,
                             limits=UpdateLimits(max_staleness=2))
    assert staleness == 2
    assert norm == pytest.approx(math.sqrt(10 * 0.25) / 2.0)


@pytest.mark.parametrize("update, kw, reason", [
    (_update(), {"current_version": 4}, "stale"),
    (_update(), {"task_version": 9}, "stale"),
    (_update(), {"fingerprint": "other"}, "fingerprint"),
    ({"a": torch.zeros(2, 3)}, {}, "names"),
    ({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, {}, "shape"),
    ({"a": torch.zeros(2, 3, dtype=torch.float16), "b": torch.zeros(4)}, {}, "dtype"),
    ({"a": torch.full((2, 3), float("inf")), "b": torch.zeros(4)}, {}, "nonfinite"),
    (_update(100.0), {"limits": UpdateLimits(norm_max=1.0)}, "norm"),
    (_update(), {"weight": float("nan")}, "malformed"),
])
def test_each_rejection_reason(update, kw, reason):
    with pytest.raises(RejectedUpdate) as info:
        _check(update, **kw)
    assert info.value.reason == reason
    assert info.value.code == f"rejected_{reason}"


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_bad_element_anywhere_is_found_and_named(flat, bad):
    """The norm is the finiteness check (one pass): a NaN or an infinity in any
    place, beside values large or tiny, makes it so, and the tensor is named."""
    shapes = {"a": (64, 70), "b": (300,), "c": (5, 5)}
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    for name, at in (("a", 0), ("a", 4479), ("b", 151), ("c", 24)):
        for scale in (1e-30, 1.0, 1e15):
            update = {k: torch.full(s, scale) for k, s in shapes.items()}
            update[name].view(-1)[at] = bad
            if flat:
                update = tensors_from_bytes(tensors_to_bytes(update))
                assert update.flat is not None
            with pytest.raises(RejectedUpdate, match=f"nonfinite: {name} contains") as info:
                validate_update(update, weight=2.0, expected_shapes=shapes, task_version=0,
                                current_version=0, limits=UpdateLimits())
            assert info.value.reason == "nonfinite"
    assert sum(sizes.values()) > 4096  # more than one block of a vectorised reduction


def test_finite_elements_too_large_to_square_are_a_norm_rejection_not_nonfinite():
    update = {"a": torch.full((2, 3), 1e30), "b": torch.zeros(4)}
    with pytest.raises(RejectedUpdate) as info:
        _check(update)
    assert info.value.reason == "norm"


@pytest.mark.parametrize("codec, tol", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 8e-3)])
def test_float_codecs_round_trip_within_their_precision(codec, tol):
    gen = torch.Generator().manual_seed(1)
    x = {"w": torch.randn(64, 32, generator=gen)}
    y = decode(encode(x, codec), codec)
    assert y["w"].dtype == torch.float32
    rel = float((y["w"] - x["w"]).abs().max() / x["w"].abs().max())
    assert rel <= tol
    assert global_norm(y) == pytest.approx(global_norm(x), rel=max(tol, 1e-7))


@pytest.mark.parametrize("codec", ["fp16", "bf16"])
def test_a_half_precision_submission_is_widened_into_one_flat_buffer(codec):
    from rewardsignal.aggregation.tensors import FlatTensors
    from rewardsignal.protocol import tensors_from_bytes, tensors_to_bytes

    gen = torch.Generator().manual_seed(2)
    x = {"b.lora_B": torch.randn(12, 4, generator=gen), "a.lora_A": torch.randn(4, 9,
                                                                               generator=gen),
         "c": torch.randn(5, generator=gen)}
    sent = encode(x, codec)
    read = tensors_from_bytes(tensors_to_bytes(sent))  # as the coordinator reads the body
    assert isinstance(read, FlatTensors) and read.flat.dtype == sent["c"].dtype
    for got in (decode(read, codec), decode(dict(sent), codec)):  # flat or not
        assert isinstance(got, FlatTensors) and got.flat is not None
        assert got.flat.dtype == torch.float32 and list(got) == sorted(x)
        for k, v in sent.items():
            assert torch.equal(got[k], v.float())  # the bits of a per-tensor cast


def test_decode_refuses_mislabelled_dtype():
    with pytest.raises(RejectedUpdate, match="codec fp16"):
        decode({"w": torch.zeros(2)}, "fp16")


def test_int8_codec_error_bound_and_size():
    from rewardsignal.protocol import tensors_to_bytes

    gen = torch.Generator().manual_seed(4)
    x = {"lora_A": torch.randn(8, 384, generator=gen), "lora_B": torch.randn(384, 8,
                                                                             generator=gen),
         "bias": torch.randn(10, generator=gen)}
    enc = encode(x, "int8")
    assert enc["lora_A::scale"].shape == (8, 1) and enc["lora_B::scale"].shape == (1, 8)
    y = decode(enc, "int8")
    for k in x:
        dim = 1 if k == "lora_A" else 0
        amax = x[k].abs().amax(dim=dim, keepdim=True) if x[k].dim() == 2 else x[k].abs().max()
        assert bool(((y[k] - x[k]).abs() <= amax / 254 + 1e-7).all()), k
    ratio = len(tensors_to_bytes(enc)) / len(tensors_to_bytes(x))
    assert ratio <= 0.27, ratio
    zeros = decode(encode({"z": torch.zeros(3, 3)}, "int8"), "int8")
    assert torch.equal(zeros["z"], torch.zeros(3, 3))


def test_int8_decode_refuses_bad_scales():
    enc = encode({"w": torch.randn(4, 6)}, "int8")
    with pytest.raises(RejectedUpdate, match="does not broadcast"):
        decode({"w": enc["w"], "w::scale": torch.ones(5, 1)}, "int8")
    with pytest.raises(RejectedUpdate):
        decode({"w": enc["w"]}, "int8")
