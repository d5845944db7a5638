"""Validation of a worker's submitted tensors before they may touch a run.

Each check raises ``RejectedUpdate(reason, message)``; reasons are a closed set
(used as a bounded metrics label): stale, shape, dtype, names, nonfinite, norm,
fingerprint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rewardsignal.aggregation.tensors import FlatTensors, Tensors, all_finite, flat_buffer, l2_norm
from rewardsignal.errors import RejectedUpdate

REASONS = ("stale", "names", "shape", "dtype", "nonfinite", "norm", "fingerprint",
           "unknown_lease", "malformed")


@dataclass(frozen=True)
class UpdateLimits:
    max_staleness: int = 0
    norm_max: float = math.inf  # on the per-unit-weight update (grad sum / weight sum)


def check_staleness(task_version: int, current_version: int, max_staleness: int) -> int:
    staleness = current_version - task_version
    if staleness < 0:
        raise RejectedUpdate("stale", f"computed on version {task_version}, newer than the "
                             f"run's {current_version}")
    if staleness > max_staleness:
        raise RejectedUpdate("stale", f"computed on version {task_version}, run is at "
                             f"{current_version} (staleness {staleness} > {max_staleness})")
    return staleness


def check_fingerprint(submitted: str, expected: str) -> None:
    if submitted != expected:
        raise RejectedUpdate("fingerprint", f"base model fingerprint {submitted[:19]}... does "
                             f"not match the run's {expected[:19]}...")


def check_tensors(update: Tensors, expected_shapes: dict[str, tuple[int, ...]]) -> float:
    """Names, shapes, dtype (float32 after decoding) and finiteness; returns the
    set's L2 norm. The norm is the finiteness check: it is NaN or infinite when
    an element is, so only a set whose norm is not finite (or one of finite
    elements too large to square) is looked at again, to name the tensor at
    fault. One pass over the values instead of three."""
    flat = flat_buffer(update)
    # A flat set's names, shapes and dtype are its layout's and its buffer's
    # (its per-tensor views need not be made to be read).
    layout = update.layout if flat is not None and isinstance(update, FlatTensors) else None
    got = {name for name, _ in layout} if layout is not None else set(update)
    missing = sorted(set(expected_shapes) - got)
    extra = sorted(got - set(expected_shapes))
    if missing or extra:
        raise RejectedUpdate("names", f"tensor names differ from the adapter's (missing "
                             f"{missing[:3]}, unexpected {extra[:3]})")
    described = (((name, shape, flat.dtype) for name, shape in layout)
                 if layout is not None and flat is not None
                 else ((name, tuple(t.shape), t.dtype) for name, t in update.items()))
    for name, shape, dtype in described:
        if shape != tuple(expected_shapes[name]):
            raise RejectedUpdate("shape", f"{name} has shape {shape}, expected "
                                 f"{tuple(expected_shapes[name])}")
        if dtype != torch.float32:
            raise RejectedUpdate("dtype", f"{name} has dtype {dtype}, expected float32")
    norm = l2_norm(update)
    if not math.isfinite(norm) and (bad := all_finite(update)) is not None:
        raise RejectedUpdate("nonfinite", f"{bad} contains NaN or infinity")
    return norm


def check_norm(norm: float, weight: float, norm_max: float) -> float:
    """The update's norm (``check_tensors``) per unit of loss weight, checked
    against ``norm_max``; returns it."""
    norm = norm / max(abs(weight), 1e-12)
    if not math.isfinite(norm) or norm > norm_max:
        raise RejectedUpdate("norm", f"update norm per unit weight {norm:.4g} exceeds "
                             f"delta_norm_max {norm_max:.4g}")
    return norm


def validate_update(update: Tensors, *, weight: float, expected_shapes: dict[str, tuple],
                    task_version: int, current_version: int, limits: UpdateLimits
                    ) -> tuple[int, float]:
    """The tensor checks, cheapest first (the base fingerprint is checked once,
    on the whole message, before this). Returns (staleness, norm per unit weight)."""
    if not isinstance(weight, int | float) or not math.isfinite(weight):
        raise RejectedUpdate("malformed", f"weight sum must be a finite number, got {weight!r}")
    staleness = check_staleness(task_version, current_version, limits.max_staleness)
    norm = check_norm(check_tensors(update, expected_shapes), weight, limits.norm_max)
    return staleness, norm
