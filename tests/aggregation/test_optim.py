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
