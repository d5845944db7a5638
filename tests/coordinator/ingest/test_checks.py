"""The pure submission checks, without HTTP: what passes, what each rejection
reason is, and that a decoded submission drops its raw bytes."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from rewardsignal.aggregation.codecs import encode
from rewardsignal.aggregation.validate import UpdateLimits
from rewardsignal.coordinator.ingest.checks import RunView, check_submission
from rewardsignal.coordinator.scheduling.tasks import Task
from rewardsignal.errors import RejectedUpdate
from rewardsignal.protocol import tensors_to_bytes

SHAPES = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (3, 2)}
RUN = RunView("fp-1", 4, SHAPES)
DATUMS = [{"model_input": [1, 2, 3]}, {"model_input": [4, 5]}]


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _task(loop, kind: str, payload: dict | None = None, **kw) -> Task:
    payload = payload if payload is not None else {"datums": DATUMS}
    return Task("t-1", kind, "run-1", "signal-tiny", kw.pop("version", 4), payload, 5,
                loop.create_future(), **kw)


def _grads(v: float = 0.1) -> dict:
    return {k: torch.full(s, v) for k, s in SHAPES.items()}


def _msg(**kw) -> dict:
    msg = {"fingerprint": "fp-1", "version": 4, "codec": "fp32",
           "tensors": tensors_to_bytes(_grads()),
           "result": {"loss_sum": 3.0, "weight_sum": 4.0,
                      "logprobs": [[-1.0] * 3, [-0.5] * 2]}}
    msg.update(kw)
    return msg


def test_valid_gradient_passes_with_staleness_and_norm(loop):
    msg = _msg()
    checked = check_submission(_task(loop, "forward_backward"), RUN, msg, UpdateLimits())
    assert checked.result["loss_sum"] == 3.0 and checked.result["weight_sum"] == 4.0
    assert checked.staleness == 0
    assert checked.norm == pytest.approx(math.sqrt(12 * 0.01) / 4.0)
    assert torch.equal(checked.tensors["a.lora_A.weight"], _grads()["a.lora_A.weight"])
    assert "tensors" not in msg  # the raw bytes are dropped once decoded


def test_compressed_codec_is_decoded_to_fp32(loop):
    msg = _msg(codec="int8", tensors=tensors_to_bytes(encode(_grads(), "int8")))
    checked = check_submission(_task(loop, "forward_backward"), RUN, msg, UpdateLimits())
    assert all(t.dtype == torch.float32 for t in checked.tensors.values())


def test_forward_has_no_tensors(loop):
    msg = _msg()
    del msg["tensors"]
    checked = check_submission(_task(loop, "forward"), RUN, msg, UpdateLimits())
    assert checked.tensors is None and checked.staleness is None
    assert checked.result["logprobs"][1] == [-0.5, -0.5]


@pytest.mark.parametrize("change, reason", [
    ({"fingerprint": "fp-2"}, "fingerprint"),
    ({"fingerprint": None}, "fingerprint"),
    ({"version": 3}, "stale"),
    ({"result": None}, "malformed"),
    ({"tensors": None}, "malformed"),
    ({"tensors": b"not safetensors"}, "malformed"),
    ({"result": {"loss_sum": float("nan"), "weight_sum": 1.0, "logprobs": []}}, "nonfinite"),
    ({"result": {"loss_sum": 1.0, "weight_sum": 1.0, "logprobs": [[-1.0] * 3]}}, "malformed"),
    ({"result": {"loss_sum": 1.0, "weight_sum": 1.0, "logprobs": [[-1.0] * 2, [-1.0] * 2]}},
     "shape"),
    # Each logprob must be a finite int or float: not NaN, infinite, a bool, a
    # string (even one that reads as a number), a list, None, or an int beyond
    # float64.
    *[({"result": {"loss_sum": 1.0, "weight_sum": 1.0,
                   "logprobs": [[-1.0, -1, bad], [-0.5] * 2]}}, "nonfinite")
      for bad in (float("nan"), float("-inf"), True, "-1.5", [-1.0], None, 10 ** 400)],
])
def test_each_rejection_reason(loop, change, reason):
    with pytest.raises(RejectedUpdate) as info:
        check_submission(_task(loop, "forward_backward"), RUN, _msg(**change), UpdateLimits())
    assert info.value.reason == reason


def test_run_newer_than_task_beyond_limit_is_stale(loop):
    run = RunView("fp-1", 5, SHAPES)
    with pytest.raises(RejectedUpdate, match="stale"):
        check_submission(_task(loop, "forward_backward"), run, _msg(), UpdateLimits())
    ok = check_submission(_task(loop, "forward_backward"), run, _msg(),
                          UpdateLimits(max_staleness=1))
    assert ok.staleness == 1


def test_train_delta_uses_the_tasks_own_limits(loop):
    metrics = {"train_loss_mean": 1.0, "train_loss_last": 0.9, "grad_norm_mean": 0.5,
               "steps": 2, "num_samples": 4, "tokens": 40, "duration_s": 0.1}
    tight = _task(loop, "train", payload={}, limits=UpdateLimits(norm_max=1e-6))
    with pytest.raises(RejectedUpdate, match="norm"):
        check_submission(tight, RUN, _msg(result=metrics), UpdateLimits())
    checked = check_submission(_task(loop, "train", payload={}), RUN, _msg(result=metrics),
                               UpdateLimits())
    assert set(checked.result) == {"metrics", "version", "delta"} and checked.tensors is None
    with pytest.raises(RejectedUpdate, match="no work"):
        check_submission(_task(loop, "train", payload={}), RUN,
                         _msg(result={**metrics, "tokens": 0}), UpdateLimits())


def test_sample_outputs_are_checked_against_the_request(loop):
    task = _task(loop, "sample", payload={"prompt_tokens": [[1, 2]], "max_tokens": 2})
    good = {"outputs": [{"text": "hi", "tokens": [5, 6], "logprobs": [-0.1, -0.2]}]}
    assert check_submission(task, RUN, _msg(result=good), UpdateLimits()).result == good
    for bad in ({"outputs": []},
                {"outputs": [{"text": "hi", "tokens": [5, 6, 7], "logprobs": [-1.0] * 3}]},
                {"outputs": [{"text": "hi", "tokens": [5], "logprobs": [float("inf")]}]}):
        with pytest.raises(RejectedUpdate, match="malformed"):
            check_submission(task, RUN, _msg(result=bad), UpdateLimits())
