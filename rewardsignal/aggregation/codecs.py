"""Codecs for submitted tensors: the worker encodes, the coordinator decodes to
float32 before validation. The codec's name travels in the message.

- ``fp32``: exact. ``fp16`` / ``bf16``: a cast (relative error <= 2^-11 / 2^-8).
- ``int8``: symmetric quantisation with one fp32 scale per slice along a
  tensor's smaller dimension (a LoRA A [r, in] gets r scales, a B [out, r] gets
  r scales), sent as ``<name>`` (int8) plus ``<name>::scale`` (fp32, shaped to
  broadcast). Error bound: |x - decode(encode(x))| <= scale / 2 =
  max|slice| / 254 per element. Bytes: numel + 4 * min(dims), about 0.25 of fp32.
"""

from __future__ import annotations

import torch

from rewardsignal.aggregation.tensors import FlatTensors, Tensors, flat_buffer, flat_by_name
from rewardsignal.errors import RejectedUpdate, ValidationError

_FLOAT_CODECS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CODECS = (*_FLOAT_CODECS, "int8")
_SCALE = "::scale"


def _scale_dim(t: torch.Tensor) -> int | None:
    """The dimension that keeps its own scales (the smaller one); None for 1-D."""
    if t.dim() != 2:
        return None
    return 0 if t.shape[0] <= t.shape[1] else 1


def _encode_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = t.detach().float()
    dim = _scale_dim(t)
    if dim is None:
        amax = t.abs().max().reshape(1)
    else:
        amax = t.abs().amax(dim=1 - dim, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(t / scale).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def encode(tensors: Tensors, codec: str) -> Tensors:
    if codec == "int8":
        out: Tensors = {}
        for k, v in tensors.items():
            out[k], out[k + _SCALE] = _encode_int8(v)
        return out
    if codec not in _FLOAT_CODECS:
        raise ValidationError(f"unknown codec {codec!r}; expected one of {list(CODECS)}")
    dtype = _FLOAT_CODECS[codec]
    flat = flat_buffer(tensors)
    if flat is not None and isinstance(tensors, FlatTensors):
        # One cast of the buffer, and still flat: ``tensors_to_bytes`` copies it whole.
        return tensors.with_buffer(flat.detach().to(dtype).contiguous())
    return {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}


def decode(tensors: Tensors, codec: str) -> Tensors:
    if codec == "int8":
        out: Tensors = {}
        for k, q in tensors.items():
            if k.endswith(_SCALE):
                continue
            scale = tensors.get(k + _SCALE)
            if q.dtype != torch.int8 or scale is None or scale.dtype != torch.float32:
                raise RejectedUpdate("dtype", f"{k}: int8 codec needs an int8 tensor and an "
                                     f"fp32 {k + _SCALE}")
            try:
                out[k] = q.float() * scale
            except RuntimeError:
                raise RejectedUpdate("shape", f"{k + _SCALE} does not broadcast over {k}") \
                    from None
            if out[k].shape != q.shape:
                raise RejectedUpdate("shape", f"{k + _SCALE} does not broadcast over {k}")
        orphans = [k for k in tensors if k.endswith(_SCALE) and k[: -len(_SCALE)] not in tensors]
        if orphans:
            raise RejectedUpdate("names", f"scale without tensor: {orphans[:3]}")
        return out
    if codec not in _FLOAT_CODECS:
        raise RejectedUpdate("malformed", f"unknown codec {codec!r}")
    dtype = _FLOAT_CODECS[codec]
    flat = flat_buffer(tensors)
    for k, v in ((("the buffer", flat),) if flat is not None else tensors.items()):
        if v.dtype != dtype:
            raise RejectedUpdate("dtype", f"{k} is {v.dtype} but codec {codec} says {dtype}")
    if dtype == torch.float32:
        return tensors  # as decoded (a flat set stays flat)
    return _widen(tensors)


def _widen(tensors: Tensors) -> FlatTensors:
    """fp16/bf16 tensors as one flat fp32 set (the same bits as ``v.float()``
    for each): one cast kernel for a flat set, and the checks and sums after it
    are then one kernel each as for an fp32 submission."""
    flat = flat_buffer(tensors)
    if flat is not None and isinstance(tensors, FlatTensors):
        return tensors.with_buffer(flat.float())
    return flat_by_name(tensors)
