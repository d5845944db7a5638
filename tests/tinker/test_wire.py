"""The Tinker front end's pieces without processes: the protobuf schema
against the SDK's own encoder and decoder, and per-model seq_id ordering."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import (
    deserialize_forward_backward_output,
    deserialize_sample_response,
)

from rewardsignal.coordinator.tinker import wire
from rewardsignal.coordinator.tinker.futures import Futures, Sequencer
from rewardsignal.errors import ValidationError
from rewardsignal.losses import compute_loss


def _request(data, **kw) -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, **kw),
        model_id="s:train:0", seq_id=7)
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = True
    return msg.SerializeToString()


def test_a_request_the_sdk_encodes_reads_back_whole():
    d = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]), loss_fn_inputs={
        "target_tokens": np.array([6, 7, 8]), "weights": np.array([0.0, 1.0, 0.5]),
        "advantages": np.array([1.0, -1.0, 2.0]), "logprobs": np.array([-1.0, -2.0, -3.0])})
    call = wire.read_forward_backward(_request(
        [d], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7}))
    assert (call.model_id, call.seq_id, call.forward_only, call.loss_fn) == (
        "s:train:0", 7, True, "ppo")
    assert call.loss_fn_config == {"clip_low_threshold": pytest.approx(0.7)}
    assert call.batch == [{"model_input": [5, 6, 7], "loss_fn_inputs": {
        "target_tokens": [6, 7, 8], "weights": [0.0, 1.0, 0.5], "advantages": [1.0, -1.0, 2.0],
        "logprobs": [-1.0, -2.0, -3.0]}}]


@pytest.mark.parametrize("inputs, message", [
    ({"target_tokens": np.array([1, 2]), "mask": np.array([1.0, 1.0])}, "unknown input 'mask'"),
    ({"target_tokens": np.array([[1, 2]])}, "1-D"),
    ({"target_tokens": np.array([1, 2]), "weights": np.array([np.nan, 1.0])}, "non-finite"),
])
def test_inputs_signal_cannot_take_are_refused_by_name(inputs, message):
    d = types.Datum(model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs=inputs)
    with pytest.raises(ValidationError, match=message):
        wire.read_forward_backward(_request([d], loss_fn="cross_entropy"))


def test_garbage_is_a_clear_error():
    with pytest.raises(ValidationError, match="not a ForwardBackwardRequest"):
        wire.read_forward_backward(b"\xff\xff\xff")


def test_results_decode_with_the_sdk():
    out = deserialize_forward_backward_output(wire.forward_output(
        {"logprobs": [[-1.0, -2.0], [-0.5]], "loss_sum": 3.5, "num_tokens": 3}))
    assert [o["logprobs"].to_numpy().tolist() for o in out.loss_fn_outputs] == [[-1.0, -2.0],
                                                                                 [-0.5]]
    assert out.metrics == {"loss:sum": 3.5, "tokens:sum": 3.0}
    seqs = [{"tokens": [4, 5], "logprobs": [-0.25, -0.5], "stop_reason": "stop"},
            {"tokens": [6], "logprobs": [-1.0], "stop_reason": "length"}]
    res = deserialize_sample_response(wire.sample_output(
        {"sequences": [seqs], "prompt_logprobs": [[None, -2.0]]}, prompt_logprobs=True))
    assert [(s.tokens, s.logprobs, s.stop_reason) for s in res.sequences] == [
        ([4, 5], [-0.25, -0.5], "stop"), ([6], [-1.0], "length")]
    assert res.prompt_logprobs == [None, -2.0]  # NaN on the wire: "not computed"


def test_calls_start_in_seq_id_order_and_resends_share_a_future():
    async def scenario():
        futures = Futures()
        seq = Sequencer(futures, next_seq=1)
        order: list[int] = []

        def call(n: int):
            async def start(turn):
                await asyncio.sleep(0.01 * (5 - n))  # later calls finish reading first
                async with turn:
                    order.append(n)
                return {"n": n}
            return start

        ids = {n: seq.offer("me", n, call(n)) for n in (3, 2, 4)}
        await asyncio.sleep(0.1)
        assert order == []  # seq 1 has not come
        assert seq.offer("me", 3, call(3)) == ids[3]  # a re-send: the same future
        ids[1] = seq.offer("me", 1, call(1))
        results = {n: await futures.wait(i, "me", 5) for n, i in ids.items()}
        assert order == [1, 2, 3, 4]
        assert results == {n: {"n": n} for n in ids}
        with pytest.raises(ValidationError, match="already applied"):
            seq.offer("me", 0, call(0))
        # A call that fails before it queues gives its turn up; the next still runs.
        async def broken(turn):
            raise ValidationError("bad arguments")
        bad, good = seq.offer("me", 5, broken), seq.offer("me", 6, call(6))
        assert (await futures.wait(bad, "me", 5))["category"] == "user"
        assert await futures.wait(good, "me", 5) == {"n": 6}

    asyncio.run(scenario())


def test_cispo_and_dro_match_their_formulas():
    torch.manual_seed(0)
    lp = (torch.randn(2, 5) - 2).requires_grad_()
    q, adv, w = torch.randn(2, 5) - 2, torch.randn(2, 5), torch.ones(2, 5)
    extra = {"logprobs": q, "advantages": adv}
    loss, _ = compute_loss("cispo", lp, w, extra, {"clip_low_threshold": 0.9,
                                                    "clip_high_threshold": 1.1})
    (grad,) = torch.autograd.grad(loss, lp)
    ratio = torch.exp(lp.detach() - q).clamp(0.9, 1.1)
    assert torch.allclose(loss, -(ratio * lp * adv).sum())
    assert torch.allclose(grad, -ratio * adv)  # the clipped ratio carries no gradient
    loss, _ = compute_loss("dro", lp, w, extra, {"beta": 0.1})
    (grad,) = torch.autograd.grad(loss, lp)
    d = lp.detach() - q
    assert torch.allclose(loss, -(lp * adv - 0.05 * (lp - q) ** 2).sum())
    assert torch.allclose(grad, -(adv - 0.1 * d))
