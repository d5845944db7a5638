"""The operation registry: one module per operation, looked up by name.

Adding an operation: write a module with an ``Operation`` subclass (see
``base``) and add an instance to ``_OPERATIONS`` below. Nothing else lists
operations: the HTTP front end, the ordered processor and recovery all come
here.
"""

from __future__ import annotations

from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.ops.compute_logprobs import ComputeLogprobs
from rewardsignal.coordinator.ops.evaluate import Evaluate
from rewardsignal.coordinator.ops.forward import Forward, ForwardBackward
from rewardsignal.coordinator.ops.load_state import LoadState
from rewardsignal.coordinator.ops.optim_step import OptimStep
from rewardsignal.coordinator.ops.sample import Sample
from rewardsignal.coordinator.ops.save_state import SaveState
from rewardsignal.coordinator.ops.train_federated import TrainFederated
from rewardsignal.errors import NotFoundError

_OPERATIONS: tuple[Operation, ...] = (
    ForwardBackward(), Forward(), OptimStep(), Sample(), ComputeLogprobs(), Evaluate(),
    SaveState(), LoadState(), TrainFederated())
REGISTRY: dict[str, Operation] = {op.name: op for op in _OPERATIONS}


def get(name: str) -> Operation:
    op = REGISTRY.get(name)
    if op is None:
        raise NotFoundError(f"unknown operation {name!r}; expected one of {list(REGISTRY)}")
    return op


__all__ = ["REGISTRY", "Operation", "get"]
