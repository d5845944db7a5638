"""Tasks (units of work a worker leases) and their leases."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.aggregation.validate import UpdateLimits
from rewardsignal.coordinator.scheduling.holds import Hold


class Sink(Protocol):
    """Where an accepted gradient is summed (a request's ``GradientSum``)."""

    def add(self, tensors: Tensors, *, owned: bool = False, worker: str = "") -> None: ...


@dataclass
class Lease:
    lease_id: str
    worker_id: str
    started: float
    deadline: float
    parked: bool = False  # the long-poll found nothing on arrival and waited for work
    uploading: bool = False  # computed; its holder is waiting for or using an upload slot
    hold: Hold | None = None  # memory counted for its result, held for a check (``holds``)


@dataclass
class Uploads:
    """The files one lease of an export task sent: ``done`` name -> {"bytes",
    "sha256"} as the coordinator measured them; ``receiving`` name -> bytes
    reserved from the task's budget while the file streams in."""

    done: dict[str, dict] = field(default_factory=dict)
    receiving: dict[str, int] = field(default_factory=dict)

    def used(self) -> int:
        return sum(f["bytes"] for f in self.done.values()) + sum(self.receiving.values())


@dataclass
class Task:
    task_id: str
    kind: str                     # forward_backward | forward | sample | train | export_merged
    run_id: str
    base_model: str
    version: int
    payload: dict[str, Any]       # JSON-able body the worker receives
    tokens: int
    future: asyncio.Future
    preferred_worker: str | None = None
    created: float = field(default_factory=time.monotonic)
    attempts: int = 0
    leases: dict[str, Lease] = field(default_factory=dict)
    last_error: str = ""
    job_id: str | None = None     # the federated job a train task belongs to
    limits: UpdateLimits | None = None  # per-job limits for train tasks
    sink: Sink | None = None      # where an accepted gradient is summed
    group: str = ""               # who the work is for (the run's owner): fair shares
    claimed: bool = False         # a submission passed validation and is being applied
    # Verification (``coordinator.trust``): workers that may not take this task
    # (a check is never computed by the worker it checks).
    exclude: frozenset[str] = frozenset()
    checkable: bool = False       # its accepted result may be held for a check
    keep: bool = False            # a check task: its gradient is held, never summed
    done_by: str = ""             # the worker whose result was accepted
    held: Tensors | None = field(default=None, repr=False)  # gradient held for a check
    check: bool = False           # the accepted result awaits a check
    hold: Hold | None = None      # the memory that result is counted as (``holds``)
    # Files uploaded for this task (``export_merged``), by lease.
    uploads: dict[str, Uploads] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.future.done()
