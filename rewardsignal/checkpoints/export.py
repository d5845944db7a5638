"""Exports: a standard PEFT adapter directory, or the adapter merged into the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rewardsignal.checkpoints.store import ADAPTER_CONFIG_FILE, ADAPTER_FILE


def export_adapter(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy the PEFT files of a checkpoint (``PeftModel.from_pretrained`` and vLLM
    load this directory as is)."""
    src, out = Path(checkpoint_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_FILE, ADAPTER_CONFIG_FILE):
        shutil.copyfile(src / name, out / name)
    return out


def export_merged(checkpoint_dir: str | Path, base_model: str, out_dir: str | Path) -> Path:
    """Merge the LoRA into the base weights and write a ``save_pretrained`` model
    directory (with tokenizer) that ``AutoModelForCausalLM`` loads directly."""
    from peft import PeftModel

    from rewardsignal.models import load_model, load_tokenizer

    out = Path(out_dir)
    model = PeftModel.from_pretrained(load_model(base_model), str(checkpoint_dir))
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(base_model).save_pretrained(out)
    (out / "signal_export.json").write_text(json.dumps(
        {"base_model": base_model, "source_checkpoint": str(checkpoint_dir)}, indent=2))
    return out
