"""A run's base precision: the dtype the frozen base is loaded in and, for
QLoRA-style runs, how its linear weights are quantized (bitsandbytes nf4 or
int8, CUDA only). LoRA weights, gradients and deltas are fp32 whatever this says.

Coordinator and worker both derive the fingerprint a worker must report from
the base model's fingerprint and the precision it loaded (``fingerprint``), so
a gradient computed on a differently loaded base fails the existing check.

Nothing here imports bitsandbytes: ``bnb_config`` builds transformers'
``BitsAndBytesConfig`` (plain data); only loading a model with it needs the
library, and only a worker serving a quantized run does that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from rewardsignal.errors import ValidationError

BASE_DTYPES = ("auto", "bf16", "fp16", "fp32")
QUANTIZATIONS = ("nf4", "int8")
# torch dtype names of the explicit base dtypes.
TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Precision:
    """``base_dtype="auto"``: each worker's own choice (bf16 on GPUs that have it,
    fp16 on older GPUs, fp32 on CPU), as before precision was part of a run."""

    base_dtype: str = "auto"
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.base_dtype not in BASE_DTYPES:
            raise ValidationError(f"base_dtype must be one of {list(BASE_DTYPES)}, got "
                                  f"{self.base_dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValidationError(f"quantization must be null or one of {list(QUANTIZATIONS)}, "
                                  f"got {self.quantization!r}")

    @property
    def is_default(self) -> bool:
        return self.base_dtype == "auto" and self.quantization is None

    def label(self) -> str:
        return self.base_dtype + (f"+{self.quantization}" if self.quantization else "")

    def resolve(self, auto_dtype: str) -> str:
        """The explicit dtype a worker whose ``auto`` means ``auto_dtype`` loads."""
        return auto_dtype if self.base_dtype == "auto" else self.base_dtype

    def fingerprint(self, base_fingerprint: str) -> str:
        """What a worker that loaded the base this way reports. The default
        precision keeps the bare base fingerprint, so runs stored before precision
        existed and workers that predate it still agree."""
        if self.is_default:
            return base_fingerprint
        blob = f"{base_fingerprint}|{self.base_dtype}|{self.quantization or 'none'}"
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def to_json(self) -> dict:
        return {"base_dtype": self.base_dtype, "quantization": self.quantization}

    @classmethod
    def from_json(cls, d: dict | None) -> Precision:
        """From a run spec or task message; absent fields (stored before precision
        was part of a run) mean the default."""
        d = d or {}
        return cls(d.get("base_dtype") or "auto", d.get("quantization"))


def bnb_config(quantization: str, compute_dtype):
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` (QLoRA's recipe
    for nf4: 4-bit NormalFloat, double quantization of the scales, matmuls in
    ``compute_dtype``)."""
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValidationError(f"unknown quantization {quantization!r}")
