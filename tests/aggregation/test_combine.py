"""Combination rules and outer optimizers against hand-written references."""

import numpy as np
import pytest
import torch

from rewardsignal.aggregation.combine import (
    StreamingMean,
    clip_to_norm,
    coordinate_median,
    staleness_weight,
    trimmed_mean,
    weighted_mean,
)
from rewardsignal.aggregation.outer import OuterConfig, outer_step
from rewardsignal.aggregation.tensors import global_norm


def _deltas(n, seed=0, shape=(3, 4)):
    gen = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(shape, generator=gen), "b": torch.randn(5, generator=gen)}
            for _ in range(n)]


def test_weighted_mean_matches_numpy_average():
    ds, ws = _deltas(4), [1.0, 2.0, 3.0, 4.0]
    got = weighted_mean(ds, ws)
    want = np.average(np.stack([d["a"].numpy() for d in ds]), axis=0, weights=ws)
    np.testing.assert_allclose(got["a"].numpy(), want, rtol=1e-6)
    stream = StreamingMean()
    inputs = [{k: v.clone() for k, v in d.items()} for d in ds]
    for d, w in zip(inputs, ws, strict=True):
        stream.add(d, w)
    torch.testing.assert_close(stream.value()["a"], got["a"])
    assert all(torch.equal(i["a"], d["a"]) for i, d in zip(inputs, ds, strict=True))


def test_trimmed_mean_and_median_match_numpy():
    ds = _deltas(7)
    stacked = np.stack([d["a"].numpy() for d in ds])
    srt = np.sort(stacked, axis=0)
    np.testing.assert_allclose(trimmed_mean(ds, 0.2)["a"].numpy(), srt[1:6].mean(0), rtol=1e-6)
    np.testing.assert_allclose(trimmed_mean(ds, 0.0)["a"].numpy(), stacked.mean(0), rtol=1e-6)
    np.testing.assert_allclose(coordinate_median(ds)["a"].numpy(), np.median(stacked, 0))
    even = ds[:4]
    np.testing.assert_allclose(coordinate_median(even)["b"].numpy(),
                               np.median(np.stack([d["b"].numpy() for d in even]), 0), rtol=1e-6)


@pytest.mark.parametrize("attack", ["huge", "sign_flip", "noise"])
def test_trimmed_mean_resists_a_minority_of_garbage(attack):
    honest = [{k: v * 0.1 + 1.0 for k, v in d.items()} for d in _deltas(8, seed=1)]
    honest_mean = weighted_mean(honest, [1.0] * len(honest))
    gen = torch.Generator().manual_seed(2)
    bad = []
    for d in honest[:2]:  # f = 2 of n = 10 < n * trim_fraction = 3
        if attack == "huge":
            bad.append({k: torch.full_like(v, 1e6) for k, v in d.items()})
        elif attack == "sign_flip":
            bad.append({k: -50 * v for k, v in d.items()})
        else:
            bad.append({k: torch.randn(v.shape, generator=gen) * 100 for k, v in d.items()})
    merged = trimmed_mean(honest + bad, 0.3)
    plain = weighted_mean(honest + bad, [1.0] * 10)
    dist = global_norm({k: merged[k] - honest_mean[k] for k in merged})
    plain_dist = global_norm({k: plain[k] - honest_mean[k] for k in plain})
    assert dist < 0.1 * global_norm(honest_mean)
    assert plain_dist > 10 * dist


def test_clip_and_staleness_weight():
    d = {"a": torch.full((4,), 3.0)}
    assert global_norm(clip_to_norm(d, 1.0)) == pytest.approx(1.0)
    assert clip_to_norm(d, 100.0)["a"] is d["a"]
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == pytest.approx(0.5)


def test_fedavg_applies_the_delta():
    p = {"a": torch.ones(3)}
    new, state = outer_step(p, {"a": torch.full((3,), 0.5)}, {}, OuterConfig("fedavg", 1.0))
    assert torch.equal(new["a"], torch.full((3,), 1.5)) and state == {}


def test_nesterov_matches_torch_sgd():
    gen = torch.Generator().manual_seed(3)
    p = {"a": torch.randn(4, 3, generator=gen)}
    ref = torch.nn.Parameter(p["a"].clone())
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    state = {}
    cfg = OuterConfig("nesterov", 0.7, momentum=0.9)
    for _ in range(5):
        delta = {"a": torch.randn(4, 3, generator=gen)}
        ref.grad = -delta["a"]
        opt.step()
        p, state = outer_step(p, delta, state, cfg)
    torch.testing.assert_close(p["a"], ref.detach(), atol=1e-6, rtol=0)


def test_fedadam_matches_hand_written_reference():
    p = {"a": torch.tensor([1.0, -2.0])}
    cfg = OuterConfig("fedadam", 0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    m = np.zeros(2)
    v = np.zeros(2)
    x = np.array([1.0, -2.0])
    state = {}
    for delta in ([0.5, -0.1], [0.2, 0.3]):
        g = -np.array(delta)
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        x = x - 0.1 * m / (np.sqrt(v) + 1e-3)
        p, state = outer_step(p, {"a": torch.tensor(delta)}, state, cfg)
    np.testing.assert_allclose(p["a"].numpy(), x, rtol=1e-5)
