"""What an operation is: everything about one kind of request in one place.

An operation declares how its arguments are read and validated (``parse``:
nothing is queued when it raises), how they are stored durably and read back
after a restart (``dump`` / ``load``), whether it is a barrier, whether the
request timeout bounds it, how a restart may answer it from durable state
(``recovered``, ``replay``), and how it runs (``execute``). Front ends, the ordered
processor and recovery look operations up in ``REGISTRY``; none of them lists
operations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services


class Operation(ABC):
    name: ClassVar[str]
    # Waits for everything queued before it on the run, and runs alone.
    barrier: ClassVar[bool] = False
    # The request timeout applies (False: the operation bounds itself).
    bounded: ClassVar[bool] = True
    # Waits its turn in the run's queue (False: runs at once on the current
    # version; only for operations that change nothing, like ``sample``).
    ordered: ClassVar[bool] = True
    # Its effect may outrun its checkpoint: a finished request keeps its stored
    # arguments, and a restart rebuilds the effect with ``replay``.
    replayable: ClassVar[bool] = False
    # Starts while its acceptance is still being synced to the database: it
    # changes nothing that outlives the process before ``request.until_stored()``
    # (False: it starts once the request is stored).
    starts_unstored: ClassVar[bool] = False
    # A barrier that starts once the operations before it have their effects
    # in memory (``request.staged``), not once they have finished: it changes
    # nothing durable before ``request.until_prior_done()``.
    starts_on_staged: ClassVar[bool] = False

    @abstractmethod
    async def parse(self, ctx: Services, run: Run, owner: str, body: Body) -> Any:
        """Validated arguments from a request body; raises ``ValidationError``.
        Blocking work (tokenising) goes through a thread."""

    async def accept(self, ctx: Services, run: Run, owner: str, args: Any) -> dict:
        """Side effects once the arguments are valid, before the request is
        stored and queued; extra fields for the 202 answer. An operation that
        has some is not queued with others (``POST /v1/runs/{id}/requests``,
        all or none, has no way to undo them): see ``pipelined``."""
        return {}

    @property
    def pipelined(self) -> bool:
        """Whether it may be queued with other operations in one call: its
        acceptance does nothing (``accept`` is this class's)."""
        return type(self).accept is Operation.accept

    def dump(self, args: Any) -> dict:
        """The arguments as JSON, stored with the request."""
        return dict(args)

    def load(self, ctx: Services, run: Run, data: dict) -> Any:
        """``dump``'s inverse, after a restart (blocking: runs in a thread)."""
        return data

    def recovered(self, run: Run, request_id: str, manifest: dict) -> dict | None:
        """After a restart: this request's result if durable state shows it
        already took effect (so it is not applied twice); None to run it again.
        ``manifest`` is that of the run's current checkpoint."""
        return None

    async def replay(self, ctx: Services, run: Run, args: Any, request_id: str) -> dict:
        """After a restart, for a ``replayable`` operation that finished but whose
        checkpoint had not landed: apply it again to the run as it was before,
        from the same durable inputs (the same result, bit for bit)."""
        raise NotImplementedError(f"{self.name} is not replayable")

    @abstractmethod
    async def execute(self, ctx: Services, run: Run, request: Request, args: Any) -> dict:
        """Run the operation; its result is the request's result."""

    def answered(self, ctx: Services, run: Run) -> None:
        """Once its result is on the request (done or failed): what may wait
        until the answer is on its way (``optim_step``: the new version's push
        to waiting leases). Most operations have nothing."""
        return None
