"""Exports: a standard PEFT adapter directory, or the adapter merged into the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rewardsignal.checkpoints.store import ADAPTER_CONFIG_FILE, ADAPTER_FILE

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
