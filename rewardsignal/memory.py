"""How much device memory training a LoRA on a base model takes, from the
model's config alone (no weights are read), so the coordinator can place a run
on workers that can hold it without ever loading the base itself.

The estimate has three parts:
  weights      the frozen base at the run's precision (nf4/int8 quantize the
               decoder blocks' linear weights; embeddings, norms and the output
               head stay at the compute dtype, as bitsandbytes leaves them);
  LoRA         fp32 weights, gradients and a worker's local AdamW state (4 copies);
  activations  per token in flight, at the compute dtype: what a decoder block
               keeps for backward, plus the logits, plus the T x T attention
               scores where the attention is eager (CPU workers).
It is for placement, not for a tight fit: workers still split micro-batches on
out-of-memory errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from rewardsignal.precision import DTYPE_BYTES

# Bytes per quantized linear weight: nf4 packs two weights a byte, plus its
# double-quantized scales (one 8-bit absmax per 64 weights, one fp32 per 256 of
# those); int8 is a byte plus a per-row fp32 scale, negligible at these widths.
_QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
# Values a Llama-style decoder block keeps for backward per token, as
# a x hidden + b x intermediate. Calibrated on the one measurement we have:
# signal-1b (hidden 2048, MLP 8192, 16 layers), bf16, SDPA, 16,384-token
# micro-batches peaked at 41.4 GiB on an H100 (bench/RESULTS.md, gpu_worker),
# about 80k values per token per layer; 14 h + 6 i = 77.8k.
_ACT_HIDDEN, _ACT_MLP = 14, 6
# LoRA copies a worker holds: weights, gradients, AdamW's two moments (train tasks).
_LORA_COPIES = 4
# Families whose MLP is not gated (two matrices, not three).
_UNGATED = {"gpt2", "gpt_neox", "gptj", "opt", "phi", "bloom", "falcon"}


@dataclass(frozen=True)
class ModelShape:
    """The sizes that memory depends on, read from a transformers config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated: bool = True

    @classmethod
    def from_config(cls, config) -> ModelShape:
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        return cls(
            hidden=hidden, intermediate=int(getattr(config, "intermediate_size", None)
                                            or 4 * hidden),
            layers=int(config.num_hidden_layers), heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
            vocab=int(config.vocab_size),
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            gated=getattr(config, "model_type", "") not in _UNGATED)

    def module_dims(self, name: str) -> tuple[int, int]:
        """(in, out) features of a decoder block's linear layer by its name."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, \
            self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}.get(name, (h, h))

    def linear_params(self) -> int:
        """Parameters of the decoder blocks' linear layers (what quantization packs)."""
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
        if self.gated:
            names.append("gate_proj")
        per_layer = sum(a * b for a, b in map(self.module_dims, names))
        return per_layer * self.layers

    def other_params(self) -> int:
        """Embeddings, output head (unless tied) and norms."""
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return embed + (2 * self.layers + 1) * self.hidden


@lru_cache(maxsize=64)
def shape_of(model_id: str) -> ModelShape:
    """Blocking the first time (reads the config; a hub id may be fetched)."""
    from rewardsignal.models import model_config

    return ModelShape.from_config(model_config(model_id))


def weight_bytes(shape: ModelShape, dtype: str, quantization: str | None = None) -> int:
    """The frozen base on the device: ``dtype`` is an explicit one (bf16 | fp16 | fp32)."""
    linear = shape.linear_params()
    per = _QUANT_BYTES[quantization] if quantization else DTYPE_BYTES[dtype]
    return int(linear * per + shape.other_params() * DTYPE_BYTES[dtype])


def lora_params(shape: ModelShape, r: int, targets: tuple[str, ...]) -> int:
    return r * shape.layers * sum(a + b for a, b in map(shape.module_dims, targets))


def activation_bytes_per_token(shape: ModelShape, dtype: str, *, eager_seq_len: int = 0) -> int:
    """Device bytes per token of a micro-batch, kept for backward. With eager
    attention each token also holds a row of scores and of probabilities per
    head over a sequence of ``eager_seq_len``; fused attention (SDPA) keeps none."""
    width = DTYPE_BYTES[dtype]
    block = (_ACT_HIDDEN * shape.hidden + _ACT_MLP * shape.intermediate
             + 2 * shape.heads * eager_seq_len) * width
    logits = shape.vocab * (width + 8)  # model dtype, then fp32 logits and log-softmax
    return shape.layers * block + logits


def train_memory_bytes(shape: ModelShape, *, dtype: str, quantization: str | None, lora_r: int,
                       targets: tuple[str, ...], tokens: int, eager_seq_len: int = 0) -> int:
    """Device memory to train a LoRA with ``tokens`` tokens in one micro-batch."""
    fixed = weight_bytes(shape, dtype, quantization) + 4 * _LORA_COPIES * lora_params(
        shape, lora_r, targets)
    return fixed + tokens * activation_bytes_per_token(shape, dtype,
                                                       eager_seq_len=eager_seq_len)


def estimate_train_memory_bytes(model_id: str, *, dtype: str = "bf16",
                                quantization: str | None = None, lora_r: int = 8,
                                tokens: int = 2048) -> int:
    """``train_memory_bytes`` for a model by id (its config only), LoRA on the
    seven Llama projections."""
    from rewardsignal.models import DEFAULT_TARGET_MODULES

    return train_memory_bytes(shape_of(model_id), dtype=dtype, quantization=quantization,
                              lora_r=lora_r, targets=DEFAULT_TARGET_MODULES, tokens=tokens)


# Memory of the GPUs a ``gpu_config`` names without a size ("H100:2").
_GPU_GB = {"H100": 80, "H200": 141, "A100": 40, "A10G": 24, "A10": 24, "L40S": 48, "L40": 48,
           "L4": 24, "T4": 16, "V100": 16, "RTX4090": 24, "RTX3090": 24, "A6000": 48}
# A card reports less than its label (an "80GB" H100 shows 79.6 GiB, and a
# 24 GB card 23.6): the hint asks for this share of the nominal size.
_LABEL_SHARE = 0.9


def gpu_config_memory_bytes(gpu_config: str) -> int | None:
    """Minimum memory per worker that a hosted-API style ``gpu_config``
    ("A100-80GB:2", "H100", "L4:1") asks for; None when the GPU is unknown (the
    hint is then ignored). A malformed string is a ``ValidationError``."""
    import re

    from rewardsignal.errors import ValidationError

    m = re.fullmatch(r"([A-Za-z0-9]+?)(?:-(\d+)GB)?(?::(\d{1,2}))?", gpu_config.strip())
    if m is None or (m.group(3) is not None and int(m.group(3)) < 1):
        raise ValidationError(f"gpu_config must look like 'A100-80GB:2' (name, optional "
                              f"-<N>GB, optional :<count>), got {gpu_config!r}")
    gb = int(m.group(2)) if m.group(2) else _GPU_GB.get(m.group(1).upper())
    return None if gb is None else int(gb * _LABEL_SHARE * 2**30)
