"""Outer optimizers: apply a round's combined delta to the run's adapter.

The pseudo-gradient is ``g = -delta`` (the direction the workers moved is the
negative of a gradient). Inputs are never mutated; state dicts are returned.

- ``fedavg``: ``p + lr * delta`` (lr 1 = plain FedAvg).
- ``nesterov``: SGD with Nesterov momentum on ``g`` (DiLoCo's outer step),
  exactly ``torch.optim.SGD(momentum=mu, nesterov=True)``.
- ``fedadam``: Adam on ``g`` without bias correction, ``tau`` as epsilon
  (Reddi et al., "Adaptive Federated Optimization").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.errors import ValidationError

OUTER_OPTIMIZERS = ("fedavg", "nesterov", "fedadam")
DEFAULT_OUTER_LR = {"fedavg": 1.0, "nesterov": 0.7, "fedadam": 1e-2}


@dataclass(frozen=True)
class OuterConfig:
    name: str = "fedavg"
    learning_rate: float = 1.0
    momentum: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in OUTER_OPTIMIZERS:
            raise ValidationError(f"outer_optimizer must be one of {list(OUTER_OPTIMIZERS)}, "
                                  f"got {self.name!r}")
        if not 0 < self.learning_rate <= 10:
            raise ValidationError(f"outer_learning_rate must be in (0, 10], got "
                                  f"{self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValidationError(f"outer_momentum must be in [0, 1), got {self.momentum}")

    def to_json(self) -> dict:
        return asdict(self)


def outer_step(params: Tensors, delta: Tensors, state: Tensors, cfg: OuterConfig
               ) -> tuple[Tensors, Tensors]:
    if cfg.name == "fedavg":
        return {k: p + cfg.learning_rate * delta[k] for k, p in params.items()}, dict(state)
    new_params: Tensors = {}
    new_state: Tensors = {}
    for k, p in params.items():
        g = -delta[k]
        if cfg.name == "nesterov":
            buf = state.get(f"outer_momentum.{k}")
            buf = g.clone() if buf is None else buf * cfg.momentum + g
            new_state[f"outer_momentum.{k}"] = buf
            new_params[k] = p - cfg.learning_rate * (g + cfg.momentum * buf)
        else:
            m = state.get(f"outer_m.{k}", torch.zeros_like(p)) * cfg.momentum + \
                (1 - cfg.momentum) * g
            v = state.get(f"outer_v.{k}", torch.zeros_like(p)) * cfg.beta2 + \
                (1 - cfg.beta2) * g * g
            new_state[f"outer_m.{k}"], new_state[f"outer_v.{k}"] = m, v
            new_params[k] = p - cfg.learning_rate * m / (v.sqrt() + cfg.tau)
    return new_params, new_state
