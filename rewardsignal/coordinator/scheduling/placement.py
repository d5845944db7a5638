"""Placement: which workers can hold a run. A stage of scheduling that every
lease, shard plan and straggler copy goes through.

A worker can serve a run when it serves the base model, can load the base at
the run's precision (it declared the dtypes and quantizations it can load at
registration), and offers enough memory for the base at that precision, the
LoRA and the activations of one full-length sequence (``rewardsignal.memory``).
Workers that declared no memory are not held to a memory bound: they predate
placement and their out-of-memory splitting still applies.

Task size follows from the same estimate: a worker's shards of a run hold at
most the tokens whose activations fit beside that run's base and LoRA in the
memory it offers (``Requirement.task_tokens``), and never more than the task
size it declared. So a 24 GB card gets long shards of a 0.5B run and short
ones of an 8B run.
"""

from __future__ import annotations

from dataclasses import dataclass

from rewardsignal.coordinator.scheduling.workers import WorkerInfo
from rewardsignal.memory import (
    ModelShape,
    activation_bytes_per_token,
    train_memory_bytes,
    weight_bytes,
)
from rewardsignal.precision import Precision


@dataclass(frozen=True)
class Requirement:
    """What a run asks of a worker."""

    model_id: str
    precision: Precision
    shape: ModelShape | None  # None: the config was unreadable; no memory bound
    lora_r: int
    targets: tuple[str, ...]
    max_length: int
    min_memory_bytes: int | None = None  # from a gpu_config hint

    def _cost(self, w: WorkerInfo) -> tuple[int, int] | None:
        """(bytes with no tokens: base and LoRA, bytes per token of a micro-batch)
        of this run on ``w``: its ``auto`` dtype resolved, and eager attention's
        T x T scores counted on workers that are not on CUDA. None without a
        readable config."""
        if self.shape is None:
            return None
        dtype = self.precision.resolve(w.auto_dtype)
        eager = 0 if w.device.startswith("cuda") else self.max_length
        fixed = train_memory_bytes(self.shape, dtype=dtype,
                                   quantization=self.precision.quantization,
                                   lora_r=self.lora_r, targets=self.targets, tokens=0,
                                   eager_seq_len=eager)
        return fixed, activation_bytes_per_token(self.shape, dtype, eager_seq_len=eager)

    def need_bytes(self, w: WorkerInfo) -> int | None:
        """Memory ``w`` needs for this run: the base, the LoRA and one
        ``max_length`` sequence."""
        cost = self._cost(w)
        return None if cost is None else cost[0] + self.max_length * cost[1]

    def merge_host_bytes(self) -> int | None:
        """Host memory a merged export needs on a worker: the base at fp32 (what
        the merge loads) and a fifth more for the merge and the save."""
        return None if self.shape is None else int(1.2 * weight_bytes(self.shape, "fp32"))

    def task_tokens(self, w: WorkerInfo) -> int | None:
        """The most tokens of this run one task for ``w`` may hold: what fits in
        the memory it offers once the base (at the run's precision) and the LoRA
        are loaded, at the activation cost per token of this run's model. None
        when there is no bound (no memory declared, config unreadable)."""
        cost = self._cost(w)
        if cost is None or w.memory_bytes is None:
            return None
        fixed, per_token = cost
        return max(1, (w.memory_bytes - fixed) // per_token)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def refusal(w: WorkerInfo, req: Requirement) -> str | None:
    """Why ``w`` cannot serve a run with ``req``; None when it can."""
    if not w.serves(req.model_id):
        return f"does not serve base model {req.model_id}"
    p = req.precision
    if p.quantization is not None and p.quantization not in w.quantization:
        return f"cannot load {p.quantization} bases ({w.quantization_note or 'not declared'})"
    if p.base_dtype != "auto" and p.base_dtype not in (w.base_dtypes or ()):
        return f"cannot load {p.base_dtype} bases (loads {', '.join(w.base_dtypes or ['auto'])})"
    if w.memory_bytes is None:
        return None
    if req.min_memory_bytes is not None and w.memory_bytes < req.min_memory_bytes:
        return (f"offers {_gib(w.memory_bytes)}, below the run's gpu_config hint "
                f"({_gib(req.min_memory_bytes)})")
    need = req.need_bytes(w)
    if need is not None and need > w.memory_bytes:
        return (f"needs about {_gib(need)} at {p.resolve(w.auto_dtype)}"
                f"{'+' + p.quantization if p.quantization else ''}, offers "
                f"{_gib(w.memory_bytes)}")
    return None
