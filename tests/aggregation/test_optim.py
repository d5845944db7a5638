import pytest
import torch

from rewardsignal.aggregation.optim import AdamWConfig, adamw_step, clip_by_global_norm
from rewardsignal.errors import ValidationError


@pytest.mark.parametrize("wd, clip", [(0.0, None), (0.1, None), (0.0, 0.5)])
def test_adamw_matches_torch(wd, clip):
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(4, 5, generator=gen), "b": torch.randn(3, generator=gen)}
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.AdamW(list(ref.values()), lr=3e-3, betas=(0.8, 0.95), eps=1e-7,
                            weight_decay=wd)
    cfg = AdamWConfig(learning_rate=3e-3, beta1=0.8, beta2=0.95, eps=1e-7, weight_decay=wd,
                      grad_clip_norm=clip)
    state, step = {}, 0
    for _ in range(7):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        for k, p in ref.items():
            p.grad = grads[k].clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(ref.values()), clip)
        opt.step()
        before = {k: v.clone() for k, v in params.items()}
        params, state, step = adamw_step(params, grads, state, step, cfg)
        assert step == _ + 1
        for k in before:  # inputs are not mutated
            assert not torch.equal(before[k], params[k])
    for k in params:
        torch.testing.assert_close(params[k], ref[k].detach(), atol=1e-7, rtol=0)


def test_clip_matches_torch():
    grads = {"a": torch.full((3,), 4.0), "b": torch.full((2,), -3.0)}
    clipped, norm = clip_by_global_norm(grads, 1.0)
    ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    ps[0].grad, ps[1].grad = grads["a"].clone(), grads["b"].clone()
    want_norm = torch.nn.utils.clip_grad_norm_(ps, 1.0)
    assert norm == pytest.approx(float(want_norm))
    torch.testing.assert_close(clipped["a"], ps[0].grad)
    assert clip_by_global_norm(grads, 1e6)[0]["a"] is grads["a"]


@pytest.mark.parametrize("kw", [{"learning_rate": -1}, {"beta1": 1.0}, {"eps": 0},
                                {"weight_decay": -0.1}, {"grad_clip_norm": 0},
                                {"learning_rate": float("nan")}])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValidationError):
        AdamWConfig(**kw)


@pytest.mark.parametrize("flat_grads", [False, True])
def test_flat_update_has_the_bits_of_a_per_tensor_loop(flat_grads):
    """``adamw_step`` works on one flat vector; element-wise it is the same
    arithmetic as updating each tensor on its own, so the same bits. Fed flat
    gradients (decoded submissions), its outputs are flat sets in their order,
    which the next step uses as they are."""
    import math

    from rewardsignal.aggregation.tensors import FlatTensors
    from rewardsignal.protocol import tensors_from_bytes, tensors_to_bytes

    g = torch.Generator().manual_seed(3)
    params = {f"t{i}": torch.randn(i + 2, 3, generator=g) for i in (3, 0, 4, 1, 2)}
    cfg = AdamWConfig(learning_rate=1e-2, weight_decay=0.1)
    state: dict = {}
    step = 0
    for i in range(3):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        if flat_grads:
            grads = tensors_from_bytes(tensors_to_bytes(grads))
            assert isinstance(grads, FlatTensors)
            if i:  # from the second step on, every input is a flat set
                assert all(isinstance(t, FlatTensors) and t.flat is not None
                           for t in (params, state))
        new, new_state, new_step = adamw_step(params, grads, state, step, cfg)
        bias1, bias2 = 1 - cfg.beta1 ** new_step, math.sqrt(1 - cfg.beta2 ** new_step)
        for k, p in params.items():
            m = state.get(f"exp_avg.{k}", torch.zeros_like(p)).lerp(grads[k], 1 - cfg.beta1)
            v = (state.get(f"exp_avg_sq.{k}", torch.zeros_like(p)) * cfg.beta2
                 + (1 - cfg.beta2) * grads[k] * grads[k])
            want = (p * (1 - cfg.learning_rate * cfg.weight_decay)).addcdiv(
                m, v.sqrt() / bias2 + cfg.eps, value=-cfg.learning_rate / bias1)
            assert torch.equal(new[k], want)
            assert torch.equal(new_state[f"exp_avg.{k}"], m)
            assert torch.equal(new_state[f"exp_avg_sq.{k}"], v)
        params, state, step = new, new_state, new_step


def test_clipping_has_the_same_bits_whatever_order_the_gradient_arrives_in():
    from rewardsignal.protocol import tensors_from_bytes, tensors_to_bytes

    g = torch.Generator().manual_seed(5)
    params = {f"t{i}": torch.randn(i + 2, 3, generator=g) for i in (3, 0, 4, 1, 2)}
    grads = {k: 10 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    cfg = AdamWConfig(learning_rate=1e-2, grad_clip_norm=0.5)
    outs = [adamw_step(params, gr, {}, 0, cfg)[0] for gr in (
        grads, dict(reversed(grads.items())), tensors_from_bytes(tensors_to_bytes(grads)))]
    for out in outs[1:]:
        assert all(torch.equal(out[k], outs[0][k]) for k in params)
