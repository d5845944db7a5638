"""Starting a run from LoRA weights that already exist: a PEFT adapter directory
(read by the SDK and sent as ``init_adapter``) or a version of one of the
caller's runs (``init_from="run_id@version"``). Either must have been trained on
the same base with the same LoRA shapes; the weights become version 0 (the
optimizer state starts fresh)."""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from pathlib import PurePath

import torch

from rewardsignal.coordinator.fields import Body
from rewardsignal.errors import ValidationError
from rewardsignal.lora import LoraSpec
from rewardsignal.protocol import tensors_from_bytes

_RUN_REF = re.compile(r"(run-[0-9a-f]{1,64})@(\d{1,12})")


@dataclass(frozen=True)
class InitFrom:
    label: str
    run_ref: tuple[str, int] | None = None
    adapter: dict[str, torch.Tensor] | None = None


def read_init(b: Body, base_model: str, lora: LoraSpec) -> InitFrom | None:
    """``init_from`` / ``init_adapter`` from a create-run body (blocking: decodes)."""
    ref = b.str("init_from", None, max_len=200)
    upload = b.dict("init_adapter", None)
    if ref is not None and upload is not None:
        raise ValidationError("give 'init_from' or 'init_adapter', not both")
    if ref is not None:
        m = _RUN_REF.fullmatch(ref)
        if m is None:
            raise ValidationError(f"init_from {ref!r} must be 'run_id@version' (the SDK reads "
                                  "an adapter directory itself and sends it as init_adapter)")
        return InitFrom(ref, run_ref=(m.group(1), int(m.group(2))))
    if upload is None:
        return None
    label = str(upload.get("source") or "init_adapter")[:200]
    config, weights = upload.get("adapter_config"), upload.get("weights")
    if not isinstance(config, dict) or not isinstance(weights, str):
        raise ValidationError("init_adapter needs 'adapter_config' (the adapter_config.json "
                              "object) and 'weights' (adapter_model.safetensors, base64)")
    check_adapter_config(config, base_model, lora, label)
    try:
        raw = base64.b64decode(weights, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("init_adapter.weights is not base64") from None
    return InitFrom(label, adapter=tensors_from_bytes(raw))


def check_adapter_config(config: dict, base_model: str, lora: LoraSpec, label: str) -> None:
    base = config.get("base_model_name_or_path")
    if base and base != base_model and PurePath(str(base)).name != base_model:
        raise ValidationError(f"{label} was trained on {base!r}, not {base_model!r}: start "
                              f"the run on {base!r}")
    theirs = (config.get("r"), config.get("lora_alpha"),
              sorted(config.get("target_modules") or []))
    if (theirs[0] != lora.r or not isinstance(theirs[1], int | float)
            or not math.isclose(float(theirs[1]), lora.alpha) or theirs[2]
            != sorted(lora.target_modules)):
        raise ValidationError(
            f"{label} has LoRA r={theirs[0]}, lora_alpha={theirs[1]}, target_modules="
            f"{theirs[2]}; create the run with the same (asked: r={lora.r}, lora_alpha="
            f"{lora.alpha:g}, target_modules={sorted(lora.target_modules)})")


def check_weights(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                  label: str) -> dict[str, torch.Tensor]:
    """The run's version-0 adapter from given weights: same names and shapes as
    the run's LoRA layers, finite; fp32."""
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise ValidationError(f"{label} does not fit the run's LoRA layers: missing "
                              f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                              f"{extra[:3]}{'...' if len(extra) > 3 else ''}")
    out = {}
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape):
            raise ValidationError(f"{label}: {name} has shape {tuple(t.shape)}, the run's "
                                  f"LoRA layer needs {tuple(shape)} (another lora_r?)")
        t = t.to(torch.float32).contiguous()
        if not bool(torch.isfinite(t).all()):
            raise ValidationError(f"{label}: {name} has non-finite values")
        out[name] = t
    return out
