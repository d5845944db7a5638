"""What the Tinker front end names: models (each a Signal run), sampling
sessions (a run at a pinned version), ``tinker://`` checkpoint paths and the
saved-state names behind them, and how a Tinker LoRA config becomes a run's."""

from __future__ import annotations

import json
from dataclasses import dataclass

from rewardsignal.coordinator.ops.sample import context_length
from rewardsignal.errors import ValidationError
from rewardsignal.models import is_builtin, model_info, resolve_model_path

# Tinker's LoRA scale is alpha / rank with a fixed alpha.
LORA_ALPHA = 32.0
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SEGMENTS = {"weights": "w", "sampler_weights": "s"}  # tinker path segment -> name prefix


@dataclass
class Model:
    model_id: str
    owner: str
    run_id: str
    flags: dict  # train_attn / train_mlp / train_unembed


@dataclass
class Sampler:
    sampler_id: str
    owner: str
    run_id: str
    version: int
    model_path: str | None


def tinker_path(model_id: str, segment: str, name: str) -> str:
    return f"tinker://{model_id}/{segment}/{name}"


def parse_path(path: object) -> tuple[str, str, str]:
    """``tinker://<model_id>/<weights|sampler_weights>/<name>`` -> its parts."""
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise ValidationError(f"path must be a tinker:// path, got {path!r}")
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3 or parts[1] not in SEGMENTS or not parts[0] or not parts[2]:
        raise ValidationError(f"path {path!r} is not tinker://<model_id>/"
                              "{weights|sampler_weights}/<name>")
    return parts[0], parts[1], parts[2]


def state_name(segment: str, name: str) -> str:
    """The run's saved-state name for a Tinker checkpoint name."""
    full = f"{SEGMENTS[segment]}.{name}"
    if len(full) > 64 or not all(c.isalnum() or c in "_.-" for c in name):
        raise ValidationError(f"checkpoint name {name!r}: use at most 62 letters, digits, "
                              "'_', '.', '-'")
    return full


def target_modules(base_model: str, lora: dict) -> tuple[str, ...]:
    present = set(model_info(base_model).default_target_modules)
    wanted = [m for flag, mods in (("train_attn", ATTN), ("train_mlp", MLP))
              if lora.get(flag, True) for m in mods if m in present]
    if lora.get("train_unembed", True):
        wanted.append("lm_head")
    if not wanted:
        raise ValidationError("lora_config trains nothing: set train_attn, train_mlp or "
                              "train_unembed")
    return tuple(wanted)


def max_length_of(base_model: str) -> int:
    """The longest sequence a model's runs take: its configured context (read
    from its ``config.json``), at most 32768 tokens (the placement memory
    estimate assumes sequences this long can come); 2048 when not stated."""
    if is_builtin(base_model):
        return context_length(base_model)
    config = resolve_model_path(base_model) / "config.json"
    try:
        n = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        n = None
    return min(int(n), 32768) if isinstance(n, int) and n > 1 else 2048
