"""A run's state on the coordinator and its checkpoints.

A run = base model + LoRA spec + optimizer config + version counter, plus the
in-memory adapter, optimizer state and the gradient accumulated since the last
step. The spec (in the database) and the checkpoint store are the durable part:
a restarted coordinator resumes each run at its latest valid checkpoint.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.checkpoints import CheckpointStore
from rewardsignal.errors import ValidationError
from rewardsignal.lora import LoraSpec, adapter_config_json


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    owner: str
    base_model: str
    fingerprint: str
    lora: LoraSpec
    optimizer: AdamWConfig
    max_length: int
    created_at: float

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "owner": self.owner, "base_model": self.base_model,
                "fingerprint": self.fingerprint, "lora": self.lora.to_json(),
                "optimizer": self.optimizer.to_json(), "max_length": self.max_length,
                "created_at": self.created_at}

    @classmethod
    def from_json(cls, d: dict) -> RunSpec:
        return cls(d["run_id"], d["owner"], d["base_model"], d["fingerprint"],
                   LoraSpec.from_json(d["lora"]), AdamWConfig(**d["optimizer"]),
                   d["max_length"], d["created_at"])


def new_run_id() -> str:
    return "run-" + secrets.token_hex(6)


@dataclass
class Accumulator:
    """Gradients summed since the last step. ``mean`` parts are divided by their
    total weight at the step; ``sum`` parts are used as they are."""

    grad_mean: Tensors | None = None
    weight_mean: float = 0.0
    grad_sum: Tensors | None = None
    calls: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    loss_weight: float = 0.0

    def add(self, grads: Tensors, weight: float, reduction: str) -> None:
        if reduction == "mean":
            self.grad_mean = _add_into(self.grad_mean, grads)
            self.weight_mean += weight
        else:
            self.grad_sum = _add_into(self.grad_sum, grads)

    @property
    def empty(self) -> bool:
        return self.grad_mean is None and self.grad_sum is None

    def gradient(self) -> Tensors:
        parts = []
        if self.grad_mean is not None and self.weight_mean != 0:
            parts.append({k: v / self.weight_mean for k, v in self.grad_mean.items()})
        if self.grad_sum is not None:
            parts.append(self.grad_sum)
        if not parts:
            raise ValidationError("the accumulated batches carry no loss weight (every token "
                                  "weight is 0), so there is no gradient to step on")
        out = parts[0]
        for p in parts[1:]:
            out = {k: out[k] + p[k] for k in out}
        return out


def _add_into(acc: Tensors | None, grads: Tensors) -> Tensors:
    # The accumulator is owned by the run, so adding in place is safe and keeps
    # coordinator memory at one adapter-sized buffer however many shards arrive.
    if acc is None:
        return {k: v.clone() for k, v in grads.items()}
    for k, v in grads.items():
        acc[k].add_(v)
    return acc


@dataclass
class Run:
    spec: RunSpec
    version: int
    adapter: Tensors
    opt_state: Tensors
    opt_step: int
    shapes: dict[str, tuple[int, ...]]
    accum: Accumulator = field(default_factory=Accumulator)
    history: list[dict] = field(default_factory=list)
    ops: asyncio.Queue | None = None
    processor: asyncio.Task | None = None
    last_loss: float | None = None
    recovered_grads: set[str] = field(default_factory=set)

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "version": self.version,
                "base_model": self.spec.base_model, "lora_r": self.spec.lora.r,
                "lora_alpha": self.spec.lora.alpha, "lora_dropout": self.spec.lora.dropout,
                "lora_target_modules": list(self.spec.lora.target_modules),
                "seed": self.spec.lora.seed, "learning_rate": self.spec.optimizer.learning_rate,
                "max_length": self.spec.max_length, "created_at": self.spec.created_at,
                "fingerprint": self.spec.fingerprint, "last_loss": self.last_loss,
                "pending_forward_backward": self.accum.calls,
                "num_parameters": sum(v.numel() for v in self.adapter.values()),
                "history": self.history[-200:]}


class RunRecords:
    """Checkpoints of runs (the run specs themselves live in the database)."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store

    def write_checkpoint(self, run: Run, *, metrics: dict | None = None,
                         request_id: str | None = None) -> Path:
        return self.store.write(
            run.run_id, run.version, adapter=run.adapter, optimizer=run.opt_state,
            adapter_config=adapter_config_json(run.spec.lora, run.spec.base_model),
            parent_version=run.version - 1 if run.version else None, metrics=metrics,
            meta={"optimizer_step": run.opt_step, "run": run.spec.to_json(),
                  "history": run.history[-1000:], "request_id": request_id})

    def load(self, spec: RunSpec) -> Run | None:
        """The run at its newest valid checkpoint (None if version 0 never landed)."""
        version = self.store.latest(spec.run_id)
        if version is None:
            return None
        ck = self.store.load(spec.run_id, version)
        return Run(spec=spec, version=version, adapter=ck.adapter, opt_state=ck.optimizer,
                   opt_step=int(ck.manifest.get("optimizer_step", 0)),
                   shapes={k: tuple(v.shape) for k, v in ck.adapter.items()},
                   history=list(ck.manifest.get("history", [])))


