"""Request fields the SDK builds on this machine: a local adapter directory sent
for ``create_run(init_from=...)``, and the per-token weights of a custom loss's
linear surrogate."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from rewardsignal.errors import ValidationError


def init_from_field(init_from: str | Path | None) -> dict:
    """The create-run field for ``init_from``: a local adapter directory is read
    here and sent (the coordinator cannot see this machine's files)."""
    if init_from is None:
        return {}
    path = Path(init_from)
    if isinstance(init_from, Path) or path.is_dir():
        config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not (config_file.is_file() and weights.is_file()):
            raise ValidationError(f"init_from {str(path)!r} is not a PEFT adapter directory "
                                  "(adapter_config.json + adapter_model.safetensors)")
        try:
            config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise ValidationError(f"{config_file}: not JSON ({exc})") from None
        return {"init_adapter": {"adapter_config": config, "source": str(path),
                                 "weights": base64.b64encode(weights.read_bytes()).decode()}}
    return {"init_from": str(init_from)}


def neg_grad(logprobs_T) -> list[float]:
    """-d loss / d logprobs: the token weights of the linear surrogate (zero where
    the loss did not use a datum at all, so its ``grad`` stayed None)."""
    import torch

    grad = logprobs_T.grad
    return (-grad if grad is not None else torch.zeros_like(logprobs_T)).tolist()
