"""The worker's engine against the single-process reference: sums over shards
reproduce the whole-batch mean-loss gradient; RL losses against hand-written
formulas."""

import math

import pytest
import torch
from reference import ReferenceTrainer

from rewardsignal.aggregation.tensors import FlatTensors
from rewardsignal.data import examples_to_datums, sample_examples
from rewardsignal.lora import init_adapter
from rewardsignal.losses import compute_loss
from rewardsignal.protocol import tensors_to_bytes
from rewardsignal.worker.engine import Engine
from rewardsignal.worker.sampling import SampleParams, row_seed


@pytest.fixture(scope="module")
def setup(tokenizer, tiny_spec):
    adapter = init_adapter("signal-tiny", tiny_spec)
    adapter = {k: (v if "lora_A" in k else torch.randn(v.shape) * 0.02)
               for k, v in adapter.items()}
    engine = Engine("cpu")
    model, key = engine.activate("signal-tiny", tiny_spec, "r", 0, adapter)
    datums = examples_to_datums(sample_examples()[:10], tokenizer)
    return engine, model, key, adapter, datums


def test_shard_sums_equal_reference_mean_gradient(setup, tiny_spec):
    engine, model, key, adapter, datums = setup
    ref = ReferenceTrainer("signal-tiny", tiny_spec, adapter, lr=1e-3)
    loss = ref.mean_loss(datums)
    loss.backward()
    want = {n.replace(".default", ""): p.grad for n, p in ref.model.named_parameters()
            if p.grad is not None}
    parts = [engine.forward_backward(model, key, chunk, "cross_entropy", {}, micro_tokens=mt)
             for chunk, mt in ((datums[:3], 100), (datums[3:], 4096))]
    weight = sum(p.weight_sum for p in parts)
    assert weight == sum(d.num_loss_tokens for d in datums)
    assert sum(p.loss_sum for p in parts) / weight == pytest.approx(float(loss), rel=1e-6)
    for name, g in want.items():
        got = sum(p.grads[name] for p in parts) / weight
        torch.testing.assert_close(got, g, atol=1e-7, rtol=1e-4)


def test_gradients_come_back_as_one_buffer_in_the_order_they_are_sent(setup):
    engine, model, key, _, datums = setup
    res = engine.forward_backward(model, key, datums[:2], "cross_entropy", {})
    params = engine._lora_params(model, key)
    assert isinstance(res.grads, FlatTensors) and res.grads.flat is not None
    assert list(res.grads) == sorted(params)  # the safetensors file's order
    assert all(g.shape == params[n].shape and g.dtype == torch.float32
               for n, g in res.grads.items())
    # Sent as the buffer itself, the same bytes as the tensors one by one.
    assert tensors_to_bytes(res.grads) == tensors_to_bytes(dict(res.grads))
    assert all(p.grad is None for p in params.values())
    # A parameter the loss did not reach gets zeros, as before.
    first = next(iter(params.values()))
    first.requires_grad_(False)
    try:
        res = engine.forward_backward(model, key, datums[:2], "cross_entropy", {})
    finally:
        first.requires_grad_(True)
    name = next(iter(params))
    assert torch.equal(res.grads[name], torch.zeros(first.shape))


def test_forward_only_returns_logprobs_without_grads(setup):
    engine, model, key, _, datums = setup
    res = engine.forward_backward(model, key, datums[:2], "cross_entropy", {}, backward=False)
    assert res.grads is None
    assert [len(lp) for lp in res.logprobs] == [len(d) for d in datums[:2]]
    assert all(x <= 0 for lp in res.logprobs for x in lp)


def test_rl_losses_match_hand_written_formulas():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    old = torch.tensor([[-1.2, -1.5, -0.5]])
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    w = torch.tensor([[1.0, 1.0, 0.0]])
    extra = {"logprobs": old, "advantages": adv}
    ratio = [math.exp(-1.0 + 1.2), math.exp(-2.0 + 1.5)]
    is_loss, wsum = compute_loss("importance_sampling", lp, w, extra, {})
    assert float(is_loss) == pytest.approx(-(ratio[0] * 1.0 + ratio[1] * -2.0))
    assert wsum == 2.0
    ppo_loss, _ = compute_loss("ppo", lp, w, extra, {"clip_low_threshold": 0.9,
                                                      "clip_high_threshold": 1.1})
    clipped = [min(r * a, min(max(r, 0.9), 1.1) * a) for r, a in zip(ratio, [1.0, -2.0], strict=True)]
    assert float(ppo_loss) == pytest.approx(-sum(clipped))
    ce, wsum = compute_loss("cross_entropy", lp, torch.tensor([[1.0, -0.5, 2.0]]), {}, {})
    assert float(ce) == pytest.approx(-(-1.0 + 1.0 + -1.0)) and wsum == 3.5


def test_sample_is_greedy_and_deterministic_at_temperature_zero(setup, tokenizer):
    engine, model, _, _, _ = setup
    prompt = [tokenizer.bos_token_id] + tokenizer.encode("Hi", add_special_tokens=False)
    stop = engine.stop_ids(model, "signal-tiny")

    def sample(temperature: float, seed: int | None) -> list[dict]:
        params = SampleParams(max_tokens=8, temperature=temperature, stop_ids=stop)
        groups, _ = engine.sample(model, "signal-tiny", [prompt], [[row_seed(seed, 0, 0)]],
                                  params)
        return groups[0]

    a = sample(0, None)
    b = sample(0, None)
    assert a == b and 1 <= len(a[0]["tokens"]) <= 8
    c = sample(1.0, 5)
    d = sample(1.0, 5)
    assert c == d


def test_micro_batching_does_not_change_results(setup):
    engine, model, key, _, datums = setup
    one = engine.forward_backward(model, key, datums, "cross_entropy", {}, micro_tokens=1 << 20)
    many = engine.forward_backward(model, key, datums, "cross_entropy", {}, micro_tokens=64)
    assert many.loss_sum == pytest.approx(one.loss_sum, rel=1e-6)
    for k in one.grads:
        torch.testing.assert_close(many.grads[k], one.grads[k], atol=1e-6, rtol=1e-4)


def test_every_module_shares_the_models_mode_which_is_set_only_when_it_changes(
        setup, tiny_spec):
    """``model.train`` visits every module (a millisecond on signal-tiny, a
    step of tens): the engine calls it only when the mode changes, and keeps
    every module in the model's mode (a new adapter's modules start in
    training mode; they take the model's)."""
    engine, model, key, adapter, datums = setup
    modes = lambda: {m.training for m in model.modules()}  # noqa: E731
    other = type(tiny_spec)(**{**vars(tiny_spec), "r": tiny_spec.r * 2})
    engine.activate("signal-tiny", other, "r2", 0,
                    {k: torch.zeros(v.shape) for k, v in
                     init_adapter("signal-tiny", other).items()})
    assert len(modes()) == 1  # the new adapter's modules too
    engine.activate("signal-tiny", tiny_spec, "r", 0, adapter)
    engine.forward_backward(model, key, datums[:1], "cross_entropy", {}, backward=False)
    calls: list[bool] = []
    real = model.train

    def train(mode: bool = True):
        calls.append(mode)
        return real(mode)

    model.train = train
    try:
        for backward in (True, True, False, False, True):
            engine.forward_backward(model, key, datums[:1], "cross_entropy", {},
                                    backward=backward)
            assert modes() == {backward}
    finally:
        del model.train
    assert calls == [True, False, True]  # once per change of mode
