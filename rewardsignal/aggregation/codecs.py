"""Codecs for submitted tensors: the worker encodes, the coordinator decodes to
float32 before validation. The codec's name travels in the message."""

from __future__ import annotations

import torch

from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.errors import RejectedUpdate, ValidationError

_FLOAT_CODECS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CODECS = tuple(_FLOAT_CODECS)


def encode(tensors: Tensors, codec: str) -> Tensors:
    if codec not in _FLOAT_CODECS:
        raise ValidationError(f"unknown codec {codec!r}; expected one of {list(CODECS)}")
    dtype = _FLOAT_CODECS[codec]
    return {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}


def decode(tensors: Tensors, codec: str) -> Tensors:
    if codec not in _FLOAT_CODECS:
        raise RejectedUpdate("malformed", f"unknown codec {codec!r}")
    dtype = _FLOAT_CODECS[codec]
    for k, v in tensors.items():
        if v.dtype != dtype:
            raise RejectedUpdate("dtype", f"{k} is {v.dtype} but codec {codec} says {dtype}")
    return {k: v.to(torch.float32) for k, v in tensors.items()}
