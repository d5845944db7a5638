"""LoRA configuration of a run, its PEFT form, and the version-0 adapter.

The adapter is initialised once, on the coordinator, from a seed stored in the
run: workers never initialise adapters. Tensor names are PEFT's saved names
(``base_model.model.<module>.lora_A.weight``) so a checkpoint is a PEFT adapter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from rewardsignal.errors import ValidationError


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or not 1 <= self.r <= 1024:
            raise ValidationError(f"lora_r must be an integer in [1, 1024], got {self.r!r}")
        if not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValidationError(f"lora_alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValidationError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t
                                              for t in self.target_modules):
            raise ValidationError("lora_target_modules must be a non-empty list of module names")

    def to_json(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_json(cls, d: dict) -> LoraSpec:
        return cls(r=d["r"], alpha=d["alpha"], dropout=d["dropout"],
                   target_modules=tuple(d["target_modules"]), seed=d.get("seed", 0))


def peft_config(spec: LoraSpec):
    from peft import LoraConfig

    # PEFT annotates lora_alpha as int, but only ever computes alpha / r with it.
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha,  # type: ignore[arg-type]
                      lora_dropout=spec.dropout,
                      target_modules=list(spec.target_modules), bias="none",
                      task_type="CAUSAL_LM")


def adapter_config_json(spec: LoraSpec, base_model: str) -> dict:
    """``adapter_config.json`` contents, as PEFT's ``save_pretrained`` writes it."""
    cfg = peft_config(spec).to_dict()
    cfg["base_model_name_or_path"] = base_model
    cfg["inference_mode"] = True
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def saved_name(param_name: str, adapter_name: str = "default") -> str:
    """PeftModel parameter name -> the key PEFT saves it under."""
    return param_name.replace(f".{adapter_name}.", ".")


@lru_cache(maxsize=8)
def adapter_shapes(model_id: str, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the run's LoRA tensors, from a meta-device skeleton
    (no weights are loaded, so this is cheap for any model size)."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from rewardsignal.models import builtin_config, is_builtin, resolve_model_path

    config = builtin_config(model_id) if is_builtin(model_id) else AutoConfig.from_pretrained(
        resolve_model_path(model_id))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        peft_model = get_peft_model(skeleton, peft_config(spec))
    except ValueError as exc:
        raise ValidationError(f"lora_target_modules {list(spec.target_modules)} do not match "
                              f"{model_id}: {exc}") from None
    return {saved_name(n): tuple(p.shape) for n, p in peft_model.named_parameters()
            if "lora_" in n}


def init_adapter(model_id: str, spec: LoraSpec) -> dict[str, torch.Tensor]:
    """Version-0 adapter: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's default,
    kaiming-uniform with a=sqrt(5)), B = 0, drawn from a generator seeded by the
    run's seed so the same run spec gives the same adapter."""
    gen = torch.Generator().manual_seed(spec.seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in sorted(adapter_shapes(model_id, spec).items()):
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(shape[1])
            out[name] = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        else:
            out[name] = torch.zeros(shape, dtype=torch.float32)
    return out
