"""Exports: a standard PEFT adapter directory, or the adapter merged into the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rewardsignal.checkpoints.store import ADAPTER_CONFIG_FILE, ADAPTER_FILE
from rewardsignal.errors import ValidationError

EXPORT_META_FILE = "signal_export.json"


def export_adapter(checkpoint_dir: str | Path, out_dir: str | Path, *,
                   precision: dict | None = None) -> Path:
    """Copy the PEFT files of a checkpoint (``PeftModel.from_pretrained`` and vLLM
    load this directory as is). The base precision the adapter was trained
    against goes into ``signal_export.json`` beside them, not into
    ``adapter_config.json``, which PEFT reads."""
    src, out = Path(checkpoint_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_FILE, ADAPTER_CONFIG_FILE):
        shutil.copyfile(src / name, out / name)
    if precision is not None:
        (out / EXPORT_META_FILE).write_text(json.dumps(
            {"source_checkpoint": str(checkpoint_dir), "precision": precision}, indent=2))
    return out


def export_merged(checkpoint_dir: str | Path, base_model: str, out_dir: str | Path, *,
                  precision: dict | None = None, source: str | None = None) -> Path:
    """Merge the LoRA into the base weights and write a ``save_pretrained`` model
    directory (with tokenizer) that ``AutoModelForCausalLM`` loads directly.
    The merge is done on the full-precision base whatever the run trained on
    (merging into quantized weights would round the adapter away); the run's
    precision is recorded in ``signal_export.json``, with ``source`` (what the
    checkpoint is, when its folder is a temporary one)."""
    from peft import PeftModel

    from rewardsignal.models import load_model, load_tokenizer

    out = Path(out_dir)
    model = PeftModel.from_pretrained(load_model(base_model), str(checkpoint_dir))
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(base_model).save_pretrained(out)
    (out / EXPORT_META_FILE).write_text(json.dumps(
        {"base_model": base_model, "source_checkpoint": source or str(checkpoint_dir),
         "precision": precision}, indent=2))
    return out


# What a worker may send of a merged model: its weights and, when sharded, the
# index naming each tensor's file. Everything else of the export (config,
# tokenizer, generation config) the coordinator writes from the base's own files.
MERGED_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
# Merged tensors against the base plus (B @ A) * alpha / r, recomputed in fp32:
# the same arithmetic as PEFT's merge, so only the matmul's summation order can
# differ (a relative 1e-6 at most for LoRA ranks up to 1024).
MERGE_TOLERANCE = 1e-4


def _tensor_files(directory: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name in where:
                    raise ValidationError(f"tensor {name} is in both {where[name].name} and "
                                          f"{file.name}")
                where[name] = file
    return where


def check_merged(merged_dir: str | Path, base_model: str, adapter: dict, lora: dict) -> str:
    """Check a worker's merged weights against the base and the adapter, one
    tensor at a time (memory-mapped, never the whole model): the same tensor
    names and shapes as the base; each LoRA target equal to base + (B @ A) *
    alpha / r within ``MERGE_TOLERANCE`` (relative to its largest value); every
    other tensor equal to the base's, bit for bit. ``adapter``: the version's
    adapter (PEFT saved names); ``lora``: its ``LoraSpec`` as JSON. Returns the
    merged weights' dtype ("float32", ...: what their config says), that of
    the first tensor. A
    ``ValidationError`` says what differs."""
    import torch
    from safetensors import safe_open

    from rewardsignal.models import resolve_model_path

    merged, base = _tensor_files(Path(merged_dir)), _tensor_files(resolve_model_path(base_model))
    if set(merged) != set(base):
        missing, extra = sorted(set(base) - set(merged)), sorted(set(merged) - set(base))
        raise ValidationError(f"merged weights name other tensors than the base (missing "
                              f"{missing[:3]}, unexpected {extra[:3]})")
    _check_index(Path(merged_dir), merged)
    scale = float(lora["alpha"]) / int(lora["r"])
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = adapter.get(key.replace(".lora_A.weight", ".lora_B.weight"))
            if b is None or f"{module}.weight" not in base:
                raise ValidationError(f"adapter tensor {key} names no base weight")
            deltas[f"{module}.weight"] = (a.float(), b.float())
    dtype = "float32"
    for i, name in enumerate(sorted(base)):
        with safe_open(base[name], framework="pt") as fb, \
                safe_open(merged[name], framework="pt") as fm:
            w, m = fb.get_tensor(name), fm.get_tensor(name)
        if i == 0:
            dtype = str(m.dtype).removeprefix("torch.")
        if w.shape != m.shape:
            raise ValidationError(f"merged {name} has shape {tuple(m.shape)}, the base's is "
                                  f"{tuple(w.shape)}")
        if name not in deltas:
            if not torch.equal(m.float(), w.float()):
                raise ValidationError(f"merged {name} differs from the base's, but LoRA does "
                                      "not touch it")
            continue
        a, b = deltas[name]
        want = w.float() + (b @ a) * scale
        err = float((m.float() - want).abs().max()) if want.numel() else 0.0
        bound = MERGE_TOLERANCE * max(1.0, float(want.abs().max()) if want.numel() else 0.0)
        if not err <= bound:
            raise ValidationError(f"merged {name} is not the base plus the adapter's update "
                                  f"(off by {err:.3g}, bound {bound:.3g})")
    return dtype


def _check_index(directory: Path, where: dict[str, Path]) -> None:
    """A sharded model's index must name, for each tensor, the file it is in."""
    for index in directory.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, AttributeError):
            raise ValidationError(f"{index.name} is not a safetensors index") from None
        if weight_map != {n: p.name for n, p in where.items()}:
            raise ValidationError(f"{index.name} does not map each tensor to its file")


def write_merged_config(out_dir: str | Path, base_model: str, dtype: str,
                        precision: dict | None, source: str) -> None:
    """What a merged model needs beside its weights, from the base's own files
    (config with the weights' dtype, generation config, tokenizer) and
    ``signal_export.json``: written by the coordinator, not taken from a worker."""
    from transformers import AutoConfig, GenerationConfig

    from rewardsignal.models import load_tokenizer, resolve_model_path

    out, base_dir = Path(out_dir), resolve_model_path(base_model)
    config = AutoConfig.from_pretrained(base_dir)
    config.dtype = dtype
    config.save_pretrained(out)
    if (base_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base_dir).save_pretrained(out)
    load_tokenizer(base_model).save_pretrained(out)
    (out / EXPORT_META_FILE).write_text(json.dumps(
        {"base_model": base_model, "source_checkpoint": source, "precision": precision},
        indent=2))
