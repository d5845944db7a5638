"""Whether two workers' results for the same task agree: the comparison that
verification by recomputation rests on (pure; tested against hand-made cases).

Two honest workers never return bit-identical results: thread counts, kernel
choice and micro-batch splits change the order of floating-point sums. The
tolerances below are set from ``bench/verify_tolerance.py`` (figures in
``bench/RESULTS.md``): on signal-small, fp32 gradients from different thread
counts and micro-batch splits differed by at most 4.4e-7 relative L2 (logprobs
not at all), a bf16 base against an fp32 one by 1.4e-2 (logprobs by 0.043). Each
bound is 200x (fp32) and 7x (bf16) above that, and far below what the cheap
attacks produce (a sign flip differs by 2, a 5x scale by 0.8, a gradient of
other data by ~1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rewardsignal.aggregation.tensors import FlatTensors, Tensors, flat_buffer

# Relative L2 bound per compute dtype of the two workers (the looser one wins).
TOLERANCE = {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.05}
# Quantized bases (nf4/int8) compute in bf16/fp16 over a lossy base: looser still.
QUANTIZED_TOLERANCE = 0.2
# Logprobs are compared per token: absolute bound in nats, scaled like the above.
LOGPROB_SCALE = 3.0
# Federated ``train`` deltas (K local AdamW steps: Adam's normalisation amplifies
# rounding differences). Measured on signal-small, K=8: honest fp32 deltas from
# different thread counts and micro-batch splits differ by 5.4e-6, bf16 ones by
# 7.7e-3, a bf16 base against fp32 by 5.3e-2; the cheats by 0.45 (half the local
# steps) to 2 (sign flip). fp16 and quantized bases were not measured: set between.
TRAIN_TOLERANCE = {"fp32": 1e-3, "bf16": 0.2, "fp16": 0.1}
QUANTIZED_TRAIN_TOLERANCE = 0.3
# What a delta's codec adds (relative L2 of decode(encode(delta)) to the delta;
# measured 2.0e-4 fp16, 1.6e-3 bf16, 4.3e-3 int8), each side's counted.
CODEC_ERROR = {"fp32": 0.0, "fp16": 1e-3, "bf16": 1e-2, "int8": 2e-2}


def tolerance(dtype_a: str, dtype_b: str, *, quantized: bool = False) -> float:
    """The agreement bound for results computed at ``dtype_a`` and ``dtype_b``."""
    tol = max(TOLERANCE.get(dtype_a, TOLERANCE["bf16"]), TOLERANCE.get(dtype_b, TOLERANCE["bf16"]))
    return max(tol, QUANTIZED_TOLERANCE) if quantized else tol


def train_tolerance(dtype_a: str, dtype_b: str, *, quantized: bool = False,
                    codec: str = "fp32") -> float:
    """The agreement bound for two ``train`` tasks' deltas (same shard, seed and
    K local AdamW steps) computed at ``dtype_a`` and ``dtype_b`` and sent with
    ``codec``: each side's codec error adds to the compute bound."""
    tol = max(TRAIN_TOLERANCE.get(dtype_a, TRAIN_TOLERANCE["bf16"]),
              TRAIN_TOLERANCE.get(dtype_b, TRAIN_TOLERANCE["bf16"]))
    if quantized:
        tol = max(tol, QUANTIZED_TRAIN_TOLERANCE)
    return tol + 2 * CODEC_ERROR.get(codec, CODEC_ERROR["int8"])


def delta_disagreement(a: Tensors, b: Tensors, tol: float) -> str | None:
    """Why two ``train`` deltas disagree beyond ``tol``; None when they agree."""
    rel = relative_l2(a, b)
    if rel > tol:
        return f"deltas differ by {rel:.3g} relative L2 (bound {tol:g})"
    return None


_CHUNK = 1 << 20  # elements of a flat set compared at a time (8 MB in float64)


def relative_l2(a: Tensors, b: Tensors) -> float:
    """||a - b|| / max(||a||, ||b||) over all tensors (0 when both are zero)."""
    if set(a) != set(b):
        return math.inf
    fa = flat_buffer(a)
    fb = flat_buffer(b, a.layout) if isinstance(a, FlatTensors) else None
    if fa is not None and fb is not None:  # a few kernels instead of three per tensor
        diff = na = nb = 0.0
        for x, y in zip(fa.split(_CHUNK), fb.split(_CHUNK), strict=True):
            x, y = x.double(), y.double()  # in chunks: the float64 copies stay small
            d = x - y
            diff += float(torch.dot(d, d))
            na += float(torch.dot(x, x))
            nb += float(torch.dot(y, y))
    else:
        diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
        na = sum(float(a[k].double().pow(2).sum()) for k in a)
        nb = sum(float(b[k].double().pow(2).sum()) for k in b)
    scale = max(na, nb)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff / scale)


def _relative(x: float, y: float, floor: float) -> float:
    return abs(x - y) / max(abs(x), abs(y), floor)


@dataclass(frozen=True)
class Result:
    """What is compared of one worker's answer to a ``forward_backward`` or
    ``forward`` task."""

    loss_sum: float
    weight_sum: float
    logprobs: list[list[float]]
    grads: Tensors | None = field(default=None, repr=False)


def disagreement(a: Result, b: Result, tol: float) -> str | None:
    """Why ``a`` and ``b`` disagree beyond ``tol``; None when they agree."""
    if a.weight_sum != b.weight_sum:
        return f"weight sums differ ({a.weight_sum} vs {b.weight_sum})"
    loss = _relative(a.loss_sum, b.loss_sum, 1e-6 * max(abs(a.weight_sum), 1.0))
    if loss > tol:
        return f"loss sums differ by {loss:.3g} relative (bound {tol:g})"
    if (a.grads is None) != (b.grads is None):
        return "one result has a gradient and the other has none"
    if a.grads is not None and b.grads is not None:
        rel = relative_l2(a.grads, b.grads)
        if rel > tol:
            return f"gradients differ by {rel:.3g} relative L2 (bound {tol:g})"
    worst = max((abs(x - y) for la, lb in zip(a.logprobs, b.logprobs, strict=True)
                 for x, y in zip(la, lb, strict=True)), default=0.0)
    if worst > LOGPROB_SCALE * tol:
        return f"logprobs differ by up to {worst:.3g} (bound {LOGPROB_SCALE * tol:g})"
    return None
