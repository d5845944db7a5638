"""A run's state on the coordinator.

A run = base model + LoRA spec + optimizer config + version counter, plus the
in-memory adapter, optimizer state and the gradient accumulated since the last
step. The spec (in the database) and the checkpoints (``versions``) are the
durable part: a restarted coordinator resumes each run at its latest valid
checkpoint.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.coordinator.runs.accumulator import Accumulator
from rewardsignal.lora import LoraSpec
from rewardsignal.memory import ModelShape
from rewardsignal.precision import Precision

if TYPE_CHECKING:
    from rewardsignal.coordinator.runs.processor import RunProcessor


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
    # How workers load the frozen base; ``fingerprint`` is the base's fingerprint
    # combined with it (``Precision.fingerprint``): what a worker must report.
    precision: Precision = Precision()
    gpu_config: str | None = None  # the hosted API's placement hint, as given
    log_to: tuple[str, ...] = ()  # experiment tracking: "tensorboard", "wandb"
    wandb_project: str | None = None

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "owner": self.owner, "base_model": self.base_model,
                "fingerprint": self.fingerprint, "lora": self.lora.to_json(),
                "optimizer": self.optimizer.to_json(), "max_length": self.max_length,
                "created_at": self.created_at, "precision": self.precision.to_json(),
                "gpu_config": self.gpu_config, "log_to": list(self.log_to),
                "wandb_project": self.wandb_project}

    @classmethod
    def from_json(cls, d: dict) -> RunSpec:
        # Specs stored before precision was part of a run have neither field: the
        # default precision, whose fingerprint is the bare base fingerprint stored.
        return cls(d["run_id"], d["owner"], d["base_model"], d["fingerprint"],
                   LoraSpec.from_json(d["lora"]), AdamWConfig(**d["optimizer"]),
                   d["max_length"], d["created_at"], Precision.from_json(d.get("precision")),
                   d.get("gpu_config"), tuple(d.get("log_to") or ()), d.get("wandb_project"))


def new_run_id() -> str:
    return "run-" + secrets.token_hex(6)


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
    processor: RunProcessor | None = None
    last_loss: float | None = None
    recovered_grads: set[str] = field(default_factory=set)
    # The base's sizes, for placement (None: its config could not be read).
    shape: ModelShape | None = None

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
                **self.spec.precision.to_json(), "gpu_config": self.spec.gpu_config,
                "pending_forward_backward": self.accum.calls,
                "num_parameters": sum(v.numel() for v in self.adapter.values()),
                "history": self.history[-200:]}
