"""The agreement test of verification against hand-computed cases: honest
rounding noise agrees, the cheap attacks (sign flip, 5x scale, other data) do
not, and the bound follows the looser of the two dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from rewardsignal.aggregation.agreement import (
    Result,
    delta_disagreement,
    disagreement,
    relative_l2,
    tolerance,
    train_tolerance,
)


def _grads(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.randn(7, generator=g)}


def _result(grads, loss_sum=3.0, weight_sum=5.0, logprobs=None) -> Result:
    return Result(loss_sum, weight_sum, logprobs or [[-1.0, -2.0], [-0.5]], grads)


def test_relative_l2_by_hand():
    a = {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([4.0])}
    b = {"x": torch.tensor([3.0, 1.0]), "y": torch.tensor([4.0])}
    # ||a - b|| = 1, max(||a||, ||b||) = sqrt(26)
    assert math.isclose(relative_l2(a, b), 1 / math.sqrt(26), rel_tol=1e-12)
    assert relative_l2(a, a) == 0.0
    assert relative_l2({"x": torch.zeros(2)}, {"x": torch.zeros(2)}) == 0.0
    assert relative_l2(a, {"x": a["x"]}) == math.inf  # different names never agree


@pytest.mark.parametrize("chunk", [1 << 20, 64])  # one chunk; several, one of them short
def test_relative_l2_of_flat_sets_is_the_per_tensor_value(chunk, monkeypatch):
    from rewardsignal.aggregation import agreement
    from rewardsignal.protocol import tensors_from_bytes, tensors_to_bytes

    monkeypatch.setattr(agreement, "_CHUNK", chunk)
    flat_seen = []
    real_flat_buffer = agreement.flat_buffer

    def spy(*args):
        flat_seen.append(real_flat_buffer(*args) is not None)
        return real_flat_buffer(*args)

    monkeypatch.setattr(agreement, "flat_buffer", spy)

    gen = torch.Generator().manual_seed(3)
    a = {"x": torch.randn(40, 8, generator=gen), "y": torch.randn(17, generator=gen)}
    b = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in a.items()}
    fa, fb = (tensors_from_bytes(tensors_to_bytes(t)) for t in (a, b))
    assert fa.flat is not None and fb.flat is not None  # the one-kernel path is taken
    flat_value = relative_l2(fa, fb)
    assert flat_seen == [True, True]  # both sets were compared through their buffers
    assert math.isclose(flat_value, relative_l2(a, b), rel_tol=1e-12)
    assert relative_l2(fa, fa) == 0.0
    assert math.isclose(relative_l2(fa, b), relative_l2(a, b), rel_tol=1e-12)  # one flat


def test_tolerance_is_the_looser_dtype():
    assert tolerance("fp32", "fp32") < tolerance("fp32", "fp16") < tolerance("bf16", "fp32")
    assert tolerance("bf16", "bf16", quantized=True) > tolerance("bf16", "bf16")


def test_honest_noise_agrees_and_attacks_do_not():
    g = _grads(0)
    tol = tolerance("fp32", "fp32")
    noisy = {k: v * (1 + 1e-6 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)))
             for k, v in g.items()}
    assert disagreement(_result(g), _result(noisy), tol) is None
    flipped = {k: -v for k, v in g.items()}
    scaled = {k: 5 * v for k, v in g.items()}
    other = _grads(2)
    for wrong in (flipped, scaled, other):
        why = disagreement(_result(g), _result(wrong), tolerance("bf16", "bf16"))
        assert why is not None and "gradients differ" in why


def test_loss_weights_and_logprobs_are_compared():
    g = _grads(0)
    tol = tolerance("fp32", "fp32")
    assert "weight sums" in disagreement(_result(g), _result(g, weight_sum=6.0), tol)
    assert "loss sums" in disagreement(_result(g), _result(g, loss_sum=3.1), tol)
    assert "logprobs" in disagreement(_result(g), _result(g, logprobs=[[-1.0, -2.5], [-0.5]]),
                                      tol)
    assert "has a gradient" in disagreement(_result(g), _result(None), tol)
    assert disagreement(_result(None), _result(None), tol) is None  # forward results


def test_train_deltas_compare_under_the_looser_train_bound():
    """A federated delta is K steps of AdamW: honest deltas differ more than one
    gradient does (measured 5.4e-6 fp32, 5.3e-2 bf16 vs fp32), so the bound is
    looser, widened by each side's codec error, and still below every cheat
    measured (0.45 for half the local steps, 2 for a sign flip)."""
    assert train_tolerance("fp32", "fp32") > tolerance("fp32", "fp32")
    assert train_tolerance("fp32", "fp32") < train_tolerance("fp32", "fp32", codec="int8")
    assert train_tolerance("bf16", "fp32", quantized=True, codec="int8") < 0.45
    d = _grads(0)
    noisy = {k: v * (1 + 1e-5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)))
             for k, v in d.items()}
    assert delta_disagreement(d, noisy, train_tolerance("fp32", "fp32")) is None
    half = {k: 0.55 * v for k, v in d.items()}  # fewer local steps: a shorter delta
    for wrong in ({k: -v for k, v in d.items()}, half, _grads(2)):
        why = delta_disagreement(d, wrong, train_tolerance("bf16", "bf16", codec="int8"))
        assert why is not None and "deltas differ" in why


def test_relative_l2_leaves_float64_inputs_as_they_were():
    from rewardsignal.aggregation.tensors import FlatTensors

    x = FlatTensors(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), (("w", (3,)),))
    y = FlatTensors(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), (("w", (3,)),))
    assert math.isclose(relative_l2(x, y), 1 / math.sqrt(21), rel_tol=1e-12)
    assert x.flat.tolist() == [1.0, 2.0, 3.0] and y.flat.tolist() == [1.0, 2.0, 4.0]
