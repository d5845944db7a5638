"""Tinker's protobuf bodies <-> the coordinator's JSON shapes.

``read_forward_backward`` turns a ``ForwardBackwardRequest`` into the body the
``forward`` / ``forward_backward`` operations parse (the Tinker-style example
shape they already accept); ``forward_output`` and ``sample_output`` encode
those operations' results as ``ForwardBackwardOutput`` / ``SampleResponse``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rewardsignal.coordinator.tinker import schema
from rewardsignal.errors import ValidationError
from rewardsignal.losses import LOSS_FNS

_NUMPY = {schema.DTYPE_FLOAT32: np.float32, schema.DTYPE_INT64: np.int64,
          schema.DTYPE_INT32: np.int32}
# The inputs the coordinator's losses read; anything else is refused by name.
INPUT_KEYS = ("target_tokens", "weights", "logprobs", "advantages")


@dataclass(frozen=True)
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    forward_only: bool
    loss_fn: str
    loss_fn_config: dict
    batch: list[dict]  # Tinker-style examples: model_input + loss_fn_inputs


def _tensor(msg, where: str) -> np.ndarray:
    """A ``Tensor`` as a 1-D numpy array (dense or sparse CSR on the wire)."""
    dtype = _NUMPY.get(msg.dtype)
    if dtype is None:
        raise ValidationError(f"{where}: unsupported dtype {msg.dtype}")
    shape = tuple(msg.shape)
    if len(shape) != 1:
        raise ValidationError(f"{where}: shape {list(shape)}; Signal takes one value per "
                              "position (1-D)")
    if msg.WhichOneof("encoding") == "sparse_csr":
        raise ValidationError(f"{where}: sparse tensors are only sent for 2-D inputs, which "
                              "Signal does not take")
    data = msg.dense
    if len(data) % np.dtype(dtype).itemsize:
        raise ValidationError(f"{where}: {len(data)} bytes is not a whole number of values")
    arr = np.frombuffer(data, dtype=dtype)
    if arr.size != shape[0]:
        raise ValidationError(f"{where}: {arr.size} values for shape {list(shape)}")
    return arr


def _datum(d, where: str) -> dict:
    tokens: list[int] = []
    for j, chunk in enumerate(d.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise ValidationError(f"{where}.model_input[{j}]: {kind} chunks are not supported "
                                  "(text models only)")
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise ValidationError(f"{where}.model_input[{j}]: tokens are not int32")
        tokens += np.frombuffer(raw, dtype=np.int32).tolist()
    inputs = {}
    for key in d.loss_fn_inputs:
        if key not in INPUT_KEYS:
            raise ValidationError(f"{where}.loss_fn_inputs: unknown input {key!r}; Signal's "
                                  f"losses read {list(INPUT_KEYS)}")
        arr = _tensor(d.loss_fn_inputs[key], f"{where}.loss_fn_inputs.{key}")
        if key != "target_tokens" and not np.isfinite(arr).all():
            raise ValidationError(f"{where}.loss_fn_inputs.{key} has a non-finite value")
        inputs[key] = arr.tolist()
    return {"model_input": tokens, "loss_fn_inputs": inputs}


def read_forward_backward(body: bytes) -> ForwardBackwardCall:
    msg = schema.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # DecodeError, or a truncated message
        raise ValidationError(f"body is not a ForwardBackwardRequest: {exc}") from None
    if not msg.model_id:
        raise ValidationError("model_id is missing")
    if not msg.data:
        raise ValidationError("data is empty")
    config: dict = {}
    for key in msg.loss_fn_config_v2:
        value = msg.loss_fn_config_v2[key]
        config[key] = value.number if value.WhichOneof("value") == "number" else value.text
    for key in msg.loss_fn_config:
        config.setdefault(key, msg.loss_fn_config[key])
    loss_fn = msg.loss_fn or "cross_entropy"
    if loss_fn not in LOSS_FNS:
        raise ValidationError(f"loss_fn {loss_fn!r} is not supported by Signal (its formula is "
                              f"not published); use one of {list(LOSS_FNS)}, or "
                              "forward_backward_custom")
    batch = [_datum(d, f"data[{i}]") for i, d in enumerate(msg.data)]
    return ForwardBackwardCall(msg.model_id, msg.seq_id, msg.forward_only, loss_fn, config,
                               batch)


def _batched(arrays: list[np.ndarray], dtype: int, np_dtype: type) -> tuple[bytes, bytes, int]:
    """Per-datum arrays as one buffer plus int64 byte offsets (datums + 1)."""
    parts: list[np.ndarray] = [np.asarray(a, dtype=np_dtype) for a in arrays]
    sizes = np.array([0, *np.cumsum([p.nbytes for p in parts])], dtype=np.int64)
    return (b"".join(p.tobytes() for p in parts), sizes.tobytes(), dtype)


def forward_output(result: dict) -> bytes:
    """``ForwardBackwardOutput``: per datum its targets' ``logprobs`` (float32),
    and ``loss:sum`` (the Tinker losses are sums)."""
    out = schema.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    logprobs = result["logprobs"]
    record = out.loss_fn_outputs.add(num_datums=len(logprobs))
    data, offsets, dtype = _batched([np.asarray(lp, dtype=np.float32) for lp in logprobs],
                                    schema.DTYPE_FLOAT32, np.float32)
    field = record.fields["logprobs"]
    field.data, field.offsets, field.dtype = data, offsets, dtype
    out.metrics["loss:sum"] = float(result["loss_sum"])
    out.metrics["tokens:sum"] = float(result["num_tokens"])
    return out.SerializeToString()


def sample_output(result: dict, prompt_logprobs: bool) -> bytes:
    """``SampleResponse`` for one prompt: its sequences, in order."""
    out = schema.SampleResponse()
    for seq in result["sequences"][0]:
        s = out.sequences.add(
            stop_reason=schema.STOP_REASON_STOP if seq.get("stop_reason") == "stop"
            else schema.STOP_REASON_LENGTH,
            tokens=np.asarray(seq["tokens"], dtype=np.int32).tobytes())
        s.logprobs = np.asarray(seq["logprobs"], dtype=np.float32).tobytes()
    if prompt_logprobs:
        lps = result["prompt_logprobs"][0]
        out.prompt_logprobs = np.asarray([math.nan if v is None else v for v in lps],
                                         dtype=np.float32).tobytes()
    return out.SerializeToString()
