"""Workers, tasks and leases.

A task is created with an ``asyncio.Future``; the first valid submission
resolves it and every later one is a no-op. Pending tasks are handed out to
long-polling workers (their own shards first, then any they can steal), a
lease whose result will be held for a check only while the memory for held
results allows (``holds``); a lease
has a deadline that heartbeats push back; the ticker returns expired leases'
tasks to the queue and fails a task that ran out of attempts. A straggler's
task may be leased a second time to an idle worker: first result wins.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from rewardsignal.aggregation.validate import UpdateLimits
from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.scheduling.fairness import FairQueue
from rewardsignal.coordinator.scheduling.holds import Hold, HoldBudget, release
from rewardsignal.coordinator.scheduling.placement import Requirement, refusal
from rewardsignal.coordinator.scheduling.planning import plan_shards
from rewardsignal.coordinator.scheduling.stragglers import Stragglers
from rewardsignal.coordinator.scheduling.tasks import Lease, Sink, Task
from rewardsignal.coordinator.scheduling.workers import ACTIVE_WINDOW_S, WorkerInfo
from rewardsignal.data.types import Datum
from rewardsignal.errors import ConflictError, NotFoundError, TaskFailedError

log = logging.getLogger("signal.scheduler")

# A shard meant for another (active) worker may be stolen after waiting this long.
_STEAL_AFTER_S = 0.5
# How far into the pending queue a worker looks for a task it may steal.
_SCAN_LIMIT = 256
# Finished task ids remembered so a late or replayed submission is a no-op.
_REMEMBER_DONE = 50_000


class Scheduler:
    def __init__(self, *, lease_timeout_s: float, max_attempts: int, default_task_tokens: int,
                 straggler_factor: float, straggler_min_s: float, quarantine_after: int,
                 quarantine_s: float, metrics: Metrics | None = None,
                 hold_limit_bytes: int = 1 << 30) -> None:
        self.workers: dict[str, WorkerInfo] = {}
        self.tasks: dict[str, Task] = {}
        self.pending = FairQueue()
        self.lease_timeout_s = lease_timeout_s
        self.max_attempts = max_attempts
        self.default_task_tokens = default_task_tokens
        self.quarantine_after = quarantine_after
        self.quarantine_s = quarantine_s
        self.metrics = metrics
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.closing = False
        # Long-polling leases park a future here; new work wakes one per task
        # (no thundering herd of a thousand idle workers re-scanning the queue).
        self._waiters: OrderedDict[int, asyncio.Future] = OrderedDict()
        # worker id -> run id -> task ids planned for that worker
        self._preferred: dict[str, dict[str, deque[str]]] = {}
        # run id -> what a worker needs to serve it (placement)
        self.requirements: dict[str, Requirement] = {}
        self.stragglers = Stragglers(self.tasks, self.workers, factor=straggler_factor,
                                     min_s=straggler_min_s,
                                     serves=lambda w, t: self.can_serve(w, t) and self.fits(w, t))
        # Results held for a check, and leases whose results will be: what a
        # lease costs is the trust policy's to say (``Trust.hold_cost``).
        self.holds = HoldBudget(hold_limit_bytes, wake=self._notify)
        self.hold_cost: Callable[[WorkerInfo, Task], int] = lambda w, t: 0

    # -- workers -----------------------------------------------------------------
    def register(self, *, name: str, device: str, hardware: dict, max_tokens_per_task: int,
                 models: tuple[str, ...] | None, capabilities: dict | None = None,
                 token_id: str = "") -> WorkerInfo:
        worker_id = "w-" + secrets.token_hex(6)
        w = WorkerInfo(worker_id, name, device, hardware, max_tokens_per_task, models,
                       token_id=token_id).with_capabilities(capabilities)
        self.workers[worker_id] = w
        log.info("worker joined id=%s name=%s device=%s max_tokens=%d memory=%s quantization=%s",
                 worker_id, name, device, max_tokens_per_task, w.memory_bytes,
                 ",".join(w.quantization) or "none")
        return w

    def restore_worker(self, worker_id: str, info: dict) -> None:
        """A worker registered before a restart: known again, active once it calls."""
        w = WorkerInfo(worker_id, info["name"], info["device"], info.get("hardware", {}),
                       info.get("max_tokens_per_task", self.default_task_tokens),
                       tuple(info["models"]) if info.get("models") else None,
                       token_id=info.get("token_id", "")
                       ).with_capabilities(info.get("capabilities"))
        w.last_seen -= ACTIVE_WINDOW_S  # not active until it shows up
        self.workers[worker_id] = w

    def worker(self, worker_id: str) -> WorkerInfo:
        w = self.workers.get(worker_id)
        if w is None:
            raise NotFoundError(f"unknown worker {worker_id}: register again", code="unknown_worker")
        w.touch()
        return w

    def goodbye(self, w: WorkerInfo) -> int:
        """``w`` is stopping: gone at once, and the tasks it held go back to the
        queue now rather than when their leases expire. Returns how many."""
        w.departed = True
        released = self.withdraw(w, f"worker {w.name} stopped")
        log.info("worker left id=%s name=%s released=%d", w.worker_id, w.name, released)
        return released

    def withdraw(self, w: WorkerInfo, reason: str) -> int:
        """The tasks ``w`` holds go back to the queue now; how many."""
        w.current_task = None
        held = [(t, lid) for t in list(self.tasks.values())
                for lid, lease in list(t.leases.items()) if lease.worker_id == w.worker_id]
        for t, lease_id in held:
            self.release(t, lease_id, reason)
        return len(held)

    def prune(self, retention_s: float) -> list[str]:
        """Forget workers not seen for ``retention_s``; their ids."""
        now = time.monotonic()
        gone = [wid for wid, w in self.workers.items() if now - w.last_seen > retention_s]
        for wid in gone:
            del self.workers[wid]
            self._preferred.pop(wid, None)
        return gone

    # -- placement ---------------------------------------------------------------------
    def place(self, run_id: str, requirement: Requirement) -> None:
        """Record what a worker needs to serve ``run_id`` (at creation and recovery)."""
        self.requirements[run_id] = requirement

    def forget_run(self, run_id: str) -> int:
        """A deleted run: cancel its tasks (a result that arrives later finds no
        task) and drop its placement. Returns how many tasks were cancelled."""
        tasks = [t for t in self.tasks.values() if t.run_id == run_id]
        for t in tasks:
            self.cancel(t, "run deleted")
        self.requirements.pop(run_id, None)
        return len(tasks)

    def refusal(self, w: WorkerInfo, run_id: str, model_id: str) -> str | None:
        """Why ``w`` cannot serve the run; None when it can."""
        req = self.requirements.get(run_id)
        if req is None:
            return None if w.serves(model_id) else f"does not serve base model {model_id}"
        return refusal(w, req)

    def takes(self, w: WorkerInfo, t: Task) -> bool:
        """Whether ``w`` runs ``t``'s kind (an optional kind only if it declared it)
        and, for a merged export, has the host memory it needs."""
        if not w.runs(t.kind):
            return False
        if t.kind == "export_merged" and w.host_memory_bytes is not None:
            req = self.requirements.get(t.run_id)
            need = req.merge_host_bytes() if req is not None else None
            return need is None or need <= w.host_memory_bytes
        return True

    def can_serve(self, w: WorkerInfo, t: Task) -> bool:
        return self.takes(w, t) and self.refusal(w, t.run_id, t.base_model) is None

    def fits(self, w: WorkerInfo, t: Task) -> bool:
        """Whether the memory for held results has room for ``w``'s result of ``t``
        (not a placement rule: a worker kept waiting by it still counts as one
        that can serve the run)."""
        return self.holds.fits(self._held_cost(w, t))

    def _held_cost(self, w: WorkerInfo, t: Task) -> int:
        """Bytes ``w``'s result of ``t`` will hold for a check: none for a task that
        is never checked, or for a check copy (counted once computed)."""
        return self.hold_cost(w, t) if t.checkable and not t.keep else 0

    def eligible_workers(self, model_id: str, run_id: str | None = None) -> list[WorkerInfo]:
        """Live workers that can take the run's tasks (``run_id``), or, without
        one, any task on ``model_id``."""
        return [w for w in self.workers.values()
                if w.active and not w.quarantined and (
                    w.serves(model_id) if run_id is None
                    else self.refusal(w, run_id, model_id) is None)]

    def eligible_for(self, t: Task) -> list[WorkerInfo]:
        """Live workers that could take ``t`` (placement and its kind)."""
        return [w for w in self.eligible_workers(t.base_model, t.run_id) if self.takes(w, t)]

    def note_rejection(self, w: WorkerInfo, reason: str) -> None:
        w.rejections_in_row += 1
        w.rejections_total += 1
        if w.rejections_in_row >= self.quarantine_after:
            w.quarantined_until = time.monotonic() + self.quarantine_s
            w.quarantine_reason = (f"{w.rejections_in_row} rejected submissions in a row "
                                   f"(last: {reason})")
            log.warning("worker quarantined id=%s name=%s reason=%r", w.worker_id, w.name,
                        w.quarantine_reason)
            if self.metrics:
                self.metrics.quarantines.labels("rejections").inc()

    # -- planning --------------------------------------------------------------------
    def plan_shards(self, datums: list[Datum], model_id: str, run_id: str | None = None
                    ) -> list[tuple[list[int], str | None]]:
        req = self.requirements.get(run_id) if run_id is not None else None
        return plan_shards(datums, self.eligible_workers(model_id, run_id),
                           self.default_task_tokens,
                           req.task_tokens if req is not None else lambda w: None)

    # -- tasks -------------------------------------------------------------------------
    def add_task(self, *, kind: str, run_id: str, base_model: str, version: int,
                 payload: dict, tokens: int, preferred_worker: str | None = None,
                 job_id: str | None = None, limits: UpdateLimits | None = None,
                 sink: Sink | None = None, group: str = "",
                 exclude: frozenset[str] = frozenset(), keep: bool = False) -> Task:
        """``group``: who the work is for (the run's owner); runs and groups share
        the fleet fairly (``fairness``). ``keep``: a check task (its result is
        held for the verifier, never summed); it goes ahead of the run's others."""
        task = Task("t-" + secrets.token_hex(8), kind, run_id, base_model, version, payload,
                    tokens, asyncio.get_running_loop().create_future(), preferred_worker,
                    job_id=job_id, limits=limits, sink=sink, group=group, exclude=exclude,
                    keep=keep)
        self.tasks[task.task_id] = task
        self.pending.append(task)
        if preferred_worker is not None:
            by_run = self._preferred.setdefault(preferred_worker, {})
            by_run.setdefault(run_id, deque()).append(task.task_id)
        self._notify()
        return task

    def cancel(self, task: Task, reason: str) -> None:
        if not task.done:
            task.future.cancel(reason)
        self._forget(task)

    def _forget(self, task: Task) -> None:
        for lease in task.leases.values():  # leases left on it will not be answered
            release(lease.hold)
            lease.hold = None
        self.tasks.pop(task.task_id, None)
        self.finished[task.task_id] = None
        while len(self.finished) > _REMEMBER_DONE:
            self.finished.popitem(last=False)
        self.pending.remove(task)

    def _notify(self, n: int = 1) -> None:
        """Wake ``n`` parked leases to look for work."""
        while n > 0 and self._waiters:
            _, fut = self._waiters.popitem(last=False)
            if not fut.done():
                fut.set_result(None)
                n -= 1

    def close(self) -> None:
        """Answer every long-poll now so shutdown does not wait on them."""
        self.closing = True
        self._notify(len(self._waiters))

    def _pick_pending(self, w: WorkerInfo) -> Task | None:
        """The least-served run's next task this worker may take: one planned for
        it, else one it may steal."""
        now = time.monotonic()
        for run_id in self.pending.order():
            req = self.requirements.get(run_id)
            if req is not None and refusal(w, req) is not None:
                continue  # placement: this worker cannot hold the run
            t = self._own(w, run_id) or self._stealable(w, run_id, now)
            if t is not None:
                return t
        return None

    def _own(self, w: WorkerInfo, run_id: str) -> Task | None:
        by_run = self._preferred.get(w.worker_id)
        own = by_run.get(run_id) if by_run else None
        while own:
            t = self.tasks.get(own[0])
            # Still waiting (not leased, finished or handed to someone else)?
            if (t is not None and not t.done and not t.leases
                    and t.preferred_worker == w.worker_id):
                if not self.fits(w, t):
                    return None  # still planned for it, once there is room
                own.popleft()
                return t
            own.popleft()
        if by_run is not None and own is not None:
            del by_run[run_id]
        return None

    def _stealable(self, w: WorkerInfo, run_id: str, now: float) -> Task | None:
        # The head of each queue is enough: past it sit younger shards of the same
        # requests. Checks first, each queue scanned on its own (a head of checks
        # that all exclude ``w`` does not hide the run's other work from it).
        checks, rest = self.pending.queues(run_id)
        for tid in itertools.islice(checks, _SCAN_LIMIT):
            t = self.tasks[tid]
            if self._may_steal(w, t, now):
                return t
        no_room: set[str] = set()  # kinds whose held results do not fit (the same cost)
        for tid in itertools.islice(rest, _SCAN_LIMIT):
            t = self.tasks[tid]
            if t.checkable and (t.kind in no_room or not self.fits(w, t)):
                if self.pending.only(run_id, t.kind):
                    return None  # all the rest would be held too: no use looking on
                no_room.add(t.kind)
                continue
            if self._may_steal(w, t, now):
                return t
        return None

    def _may_steal(self, w: WorkerInfo, t: Task, now: float) -> bool:
        if not w.serves(t.base_model) or w.worker_id in t.exclude or not self.takes(w, t):
            return False
        if t.preferred_worker in (None, w.worker_id):
            return True
        owner = self.workers.get(t.preferred_worker)
        return (owner is None or not owner.active or owner.quarantined
                or now - t.created > _STEAL_AFTER_S)

    def _grant(self, t: Task, w: WorkerInfo, *, speculative: bool, parked: bool
               ) -> tuple[Task, Lease]:
        now = time.monotonic()
        lease = Lease("l-" + secrets.token_hex(8), w.worker_id, now, now + self.lease_timeout_s,
                      parked, hold=self.holds.take(self._held_cost(w, t)))
        t.leases[lease.lease_id] = lease
        if not speculative:
            self.pending.remove(t)
            self.pending.charge(t)
        w.current_task = t.task_id
        w.bases_loaded.add(t.base_model)
        if speculative:
            log.info("straggler task=%s re-issued to worker=%s", t.task_id, w.name)
            if self.metrics:
                self.metrics.tasks_reissued.inc()
        return t, lease

    async def lease(self, w: WorkerInfo, timeout_s: float) -> tuple[Task, Lease] | None:
        """Long-poll: the next task for ``w``, or None after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        parked = False
        while True:
            if parked and w.departed:
                # It said goodbye while this long-poll was parked: the poll is a
                # leftover of the process that left, and must not mark it alive.
                return None
            w.touch()
            if w.quarantined or self.closing:
                return None
            t = self._pick_pending(w)
            if t is not None:
                return self._grant(t, w, speculative=False, parked=parked)
            t = self.stragglers.pick(w)
            if t is not None:
                return self._grant(t, w, speculative=True, parked=parked)
            w.current_task = None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # Park until new work wakes this lease, or re-check now and then for
            # stragglers (cheap: their list is shared and cached).
            parked = True
            fut = asyncio.get_running_loop().create_future()
            self._waiters[id(fut)] = fut
            try:
                await asyncio.wait({fut}, timeout=min(left, 1.0))
            finally:
                # Gone from the line whether woken, timed out or cancelled, so
                # idle workers do not pile up futures between tasks.
                self._waiters.pop(id(fut), None)
                if not fut.done():
                    fut.cancel()

    def upload_rank(self, w: WorkerInfo) -> tuple[float, float]:
        """Where ``w``'s upload stands in the fair order (its current task's run)."""
        t = self.tasks.get(w.current_task or "")
        if t is None:
            return (float("inf"), float("inf"))
        return self.pending.rank(t.run_id, t.group)

    def note_uploading(self, w: WorkerInfo) -> None:
        """``w`` asked for an upload slot: its current task is computed, so it is no
        straggler however long the slot takes (under ingest load, re-issuing such
        tasks only doubled the uploads: 631 duplicates of 2,914 in the load bench)."""
        t = self.tasks.get(w.current_task or "")
        if t is not None:
            for lease in t.leases.values():
                if lease.worker_id == w.worker_id:
                    lease.uploading = True

    def check_lease(self, task_id: str, lease_id: str, worker_id: str) -> Task:
        """The task a submission is for; ``ConflictError`` if the lease is unknown."""
        t = self.tasks.get(task_id)
        if t is None or lease_id not in t.leases or t.leases[lease_id].worker_id != worker_id:
            raise ConflictError(f"no live lease {lease_id} on task {task_id} for this worker "
                                "(expired, finished elsewhere, or never issued)",
                                code="unknown_lease")
        return t

    def heartbeat(self, w: WorkerInfo) -> int:
        deadline = time.monotonic() + self.lease_timeout_s
        n = 0
        for t in self.tasks.values():
            for lease in t.leases.values():
                if lease.worker_id == w.worker_id:
                    lease.deadline = deadline
                    n += 1
        return n

    def holds_lease(self, worker_id: str, run_id: str) -> bool:
        """Whether ``worker_id`` holds a lease on a task of ``run_id`` (what lets a
        worker download that run's weights)."""
        return any(t.run_id == run_id and any(le.worker_id == worker_id
                                              for le in t.leases.values())
                   for t in self.tasks.values())

    def take_hold(self, t: Task, lease_id: str) -> Hold | None:
        """The lease's hold on memory for its held result, handed to the caller
        (who keeps it while the result is held, or releases it)."""
        lease = t.leases[lease_id]
        hold, lease.hold = lease.hold, None
        return hold

    def complete(self, t: Task, lease_id: str, result: Any, *, tokens: int,
                 duration_s: float) -> None:
        lease = t.leases.pop(lease_id)
        release(lease.hold)
        w = self.workers.get(lease.worker_id)
        if w is not None:
            w.rejections_in_row = 0
            w.tasks_completed += 1
            w.tokens_processed += tokens
            if w.current_task == t.task_id:  # not a task leased meanwhile (lease ahead)
                w.current_task = None
            if duration_s > 0 and tokens > 0:
                rate = tokens / duration_s
                w.tokens_per_s = rate if w.tokens_per_s is None else 0.7 * w.tokens_per_s + 0.3 * rate
        if not t.done:
            t.future.set_result(result)
        self._forget(t)

    def release(self, t: Task, lease_id: str, error: str) -> None:
        """A lease ended without a valid result (rejected, failed, expired):
        requeue the task, or fail it after ``max_attempts``."""
        lease = t.leases.pop(lease_id, None)
        if lease is not None:
            release(lease.hold)
            w = self.workers.get(lease.worker_id)
            if w is not None and w.current_task == t.task_id:
                w.current_task = None
        if t.done or t.leases:
            return  # another lease is still working on it
        t.attempts += 1
        t.last_error = error
        if t.attempts >= self.max_attempts:
            t.future.set_exception(TaskFailedError(
                f"task {t.task_id} ({t.kind}) failed after {t.attempts} attempts; last error: "
                f"{error}"))
            self._forget(t)
            return
        if self.metrics:
            self.metrics.tasks_retried.inc()
        t.preferred_worker = None
        self.pending.append(t, front=True)
        self._notify()

    def expire_leases(self) -> int:
        now = time.monotonic()
        expired = 0
        for t in list(self.tasks.values()):
            for lease_id, lease in list(t.leases.items()):
                if lease.deadline < now:
                    expired += 1
                    log.warning("lease expired task=%s worker=%s", t.task_id, lease.worker_id)
                    self.release(t, lease_id, f"lease of worker {lease.worker_id} expired")
        if expired and self.metrics:
            self.metrics.tasks_expired.inc(expired)
        return expired

    def counts(self) -> dict[str, int]:
        leased = sum(1 for t in self.tasks.values() if t.leases)
        return {"pending": len(self.pending), "leased": leased}
