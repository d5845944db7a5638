"""Workers, tasks and leases.

A task is created with an ``asyncio.Future``; the first valid submission
resolves it and every later one is a no-op. Pending tasks are handed out to
long-polling workers (their own shards first, then any they can steal); a lease
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
from dataclasses import dataclass, field
from typing import Any

from rewardsignal.data.sharding import shard_by_token_budget, split_by_shares
from rewardsignal.data.types import Datum
from rewardsignal.errors import ConflictError, NotFoundError, TaskFailedError

log = logging.getLogger("signal.scheduler")

# How long a worker may go without any request before it no longer counts as active.
_ACTIVE_WINDOW_S = 60.0
# A shard meant for another (active) worker may be stolen after waiting this long.
_STEAL_AFTER_S = 0.5
# How far into the pending queue a worker looks for a task it may steal.
_SCAN_LIMIT = 256
# Finished task ids remembered so a late or replayed submission is a no-op.
_REMEMBER_DONE = 50_000


@dataclass
class WorkerInfo:
    worker_id: str
    name: str
    device: str
    hardware: dict
    max_tokens_per_task: int
    models: tuple[str, ...] | None
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    last_seen_wall: float = field(default_factory=time.time)
    tokens_per_s: float | None = None
    tasks_completed: int = 0
    tokens_processed: int = 0
    rejections_in_row: int = 0
    rejections_total: int = 0
    quarantined_until: float = 0.0
    quarantine_reason: str = ""
    current_task: str | None = None

    def touch(self) -> None:
        self.last_seen = time.monotonic()
        self.last_seen_wall = time.time()

    @property
    def active(self) -> bool:
        return time.monotonic() - self.last_seen < _ACTIVE_WINDOW_S

    @property
    def quarantined(self) -> bool:
        return time.monotonic() < self.quarantined_until

    def serves(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def to_json(self) -> dict:
        status = ("quarantined" if self.quarantined else "busy" if self.current_task
                  else "idle" if self.active else "gone")
        return {"worker_id": self.worker_id, "name": self.name, "device": self.device,
                "hardware": self.hardware, "max_tokens_per_task": self.max_tokens_per_task,
                "tasks_completed": self.tasks_completed,
                "tokens_processed": self.tokens_processed,
                "tokens_per_s": round(self.tokens_per_s, 1) if self.tokens_per_s else None,
                "rejections": self.rejections_total, "status": status,
                "last_seen": self.last_seen_wall, "registered_at": self.registered_at}


@dataclass
class Lease:
    lease_id: str
    worker_id: str
    started: float
    deadline: float
    parked: bool = False  # the long-poll found nothing on arrival and waited for work
    uploading: bool = False  # computed; its holder is waiting for or using an upload slot


@dataclass
class Task:
    task_id: str
    kind: str                     # forward_backward | forward | sample
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
    limits: Any = None            # per-job UpdateLimits for train tasks
    sink: Any = None              # where an accepted gradient is summed (GradientSum)
    claimed: bool = False         # a submission passed validation and is being applied

    @property
    def done(self) -> bool:
        return self.future.done()


class Scheduler:
    def __init__(self, *, lease_timeout_s: float, max_attempts: int, default_task_tokens: int,
                 straggler_factor: float, straggler_min_s: float, quarantine_after: int,
                 quarantine_s: float, metrics=None) -> None:
        self.workers: dict[str, WorkerInfo] = {}
        self.tasks: dict[str, Task] = {}
        self.pending: deque[str] = deque()
        self.lease_timeout_s = lease_timeout_s
        self.max_attempts = max_attempts
        self.default_task_tokens = default_task_tokens
        self.straggler_factor = straggler_factor
        self.straggler_min_s = straggler_min_s
        self.quarantine_after = quarantine_after
        self.quarantine_s = quarantine_s
        self.metrics = metrics
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.closing = False
        # Long-polling leases park a future here; new work wakes one per task
        # (no thundering herd of a thousand idle workers re-scanning the queue).
        self._waiters: OrderedDict[int, asyncio.Future] = OrderedDict()
        self._preferred: dict[str, deque[str]] = {}
        self._stragglers: tuple[float, list[Task]] = (0.0, [])

    # -- workers -----------------------------------------------------------------
    def register(self, *, name: str, device: str, hardware: dict, max_tokens_per_task: int,
                 models: tuple[str, ...] | None) -> WorkerInfo:
        worker_id = "w-" + secrets.token_hex(6)
        w = WorkerInfo(worker_id, name, device, hardware, max_tokens_per_task, models)
        self.workers[worker_id] = w
        log.info("worker joined id=%s name=%s device=%s max_tokens=%d", worker_id, name, device,
                 max_tokens_per_task)
        return w

    def restore_worker(self, worker_id: str, info: dict) -> None:
        """A worker registered before a restart: known again, active once it calls."""
        w = WorkerInfo(worker_id, info["name"], info["device"], info.get("hardware", {}),
                       info.get("max_tokens_per_task", self.default_task_tokens),
                       tuple(info["models"]) if info.get("models") else None)
        w.last_seen -= _ACTIVE_WINDOW_S  # not active until it shows up
        self.workers[worker_id] = w

    def worker(self, worker_id: str) -> WorkerInfo:
        w = self.workers.get(worker_id)
        if w is None:
            raise NotFoundError(f"unknown worker {worker_id}: register again", code="unknown_worker")
        w.touch()
        return w

    def eligible_workers(self, model_id: str) -> list[WorkerInfo]:
        return [w for w in self.workers.values()
                if w.active and not w.quarantined and w.serves(model_id)]

    def note_rejection(self, w: WorkerInfo, reason: str) -> None:
        w.rejections_in_row += 1
        w.rejections_total += 1
        if w.rejections_in_row >= self.quarantine_after:
            w.quarantined_until = time.monotonic() + self.quarantine_s
            w.quarantine_reason = (f"{w.rejections_in_row} rejected submissions in a row "
                                   f"(last: {reason})")
            log.warning("worker quarantined id=%s name=%s reason=%r", w.worker_id, w.name,
                        w.quarantine_reason)

    # -- planning --------------------------------------------------------------------
    def plan_shards(self, datums: list[Datum], model_id: str) -> list[tuple[list[int], str | None]]:
        """Split a batch so each eligible worker gets a share proportional to its
        measured throughput, cut further to its declared task size."""
        workers = self.eligible_workers(model_id)
        if not workers:
            return [(s, None) for s in shard_by_token_budget(datums, self.default_task_tokens)]
        known = [w.tokens_per_s for w in workers if w.tokens_per_s]
        fallback = sorted(known)[len(known) // 2] if known else 1.0
        shares = [w.tokens_per_s or fallback for w in workers]
        plan: list[tuple[list[int], str | None]] = []
        parts = split_by_shares(datums, shares)
        for w, part in zip(workers, parts, strict=False):
            sub = [datums[i] for i in part]
            for shard in shard_by_token_budget(sub, w.max_tokens_per_task):
                plan.append(([part[i] for i in shard], w.worker_id))
        return plan

    # -- tasks -------------------------------------------------------------------------
    def add_task(self, *, kind: str, run_id: str, base_model: str, version: int,
                 payload: dict, tokens: int, preferred_worker: str | None = None,
                 job_id: str | None = None, limits: Any = None, sink: Any = None) -> Task:
        task = Task("t-" + secrets.token_hex(8), kind, run_id, base_model, version, payload,
                    tokens, asyncio.get_running_loop().create_future(), preferred_worker,
                    job_id=job_id, limits=limits, sink=sink)
        self.tasks[task.task_id] = task
        self.pending.append(task.task_id)
        if preferred_worker is not None:
            self._preferred.setdefault(preferred_worker, deque()).append(task.task_id)
        self._notify()
        return task

    def cancel(self, task: Task, reason: str) -> None:
        if not task.done:
            task.future.cancel(reason)
        self._forget(task)

    def _forget(self, task: Task) -> None:
        self.tasks.pop(task.task_id, None)
        self.finished[task.task_id] = None
        while len(self.finished) > _REMEMBER_DONE:
            self.finished.popitem(last=False)
        try:
            self.pending.remove(task.task_id)
        except ValueError:
            pass

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
        own = self._preferred.get(w.worker_id)
        while own:
            t = self.tasks.get(own.popleft())
            # Still waiting (not leased, finished or handed to someone else)?
            if (t is not None and not t.done and not t.leases
                    and t.preferred_worker == w.worker_id):
                return t
        now = time.monotonic()
        # The queue's head is enough: past it sit younger shards of the same requests.
        for tid in itertools.islice(self.pending, _SCAN_LIMIT):
            t = self.tasks[tid]
            if not w.serves(t.base_model):
                continue
            if t.preferred_worker in (None, w.worker_id):
                return t
            owner = self.workers.get(t.preferred_worker)
            if (owner is None or not owner.active or owner.quarantined
                    or now - t.created > _STEAL_AFTER_S):
                return t
        return None

    def _straggler_candidates(self) -> list[Task]:
        """Leased tasks running far past their expected time, recomputed at most
        twice a second however many workers ask."""
        now = time.monotonic()
        stamp, found = self._stragglers
        if now - stamp < 0.5:
            return found
        found = []
        for t in self.tasks.values():
            # Federated train tasks are not duplicated: a round already tolerates a
            # missing worker (it closes at its timeout with the others).
            if t.done or t.kind == "train" or len(t.leases) != 1:
                continue
            (lease,) = t.leases.values()
            if lease.uploading:  # done computing: a copy would only queue a second upload
                continue
            holder = self.workers.get(lease.worker_id)
            rate = holder.tokens_per_s if holder and holder.tokens_per_s else None
            expected = t.tokens / rate if rate else self.straggler_min_s
            if now - lease.started > max(self.straggler_min_s, self.straggler_factor * expected):
                found.append(t)
        self._stragglers = (now, found)
        return found

    def _pick_straggler(self, w: WorkerInfo) -> Task | None:
        for t in self._straggler_candidates():
            if t.done or len(t.leases) != 1 or not w.serves(t.base_model):
                continue
            (lease,) = t.leases.values()
            if lease.worker_id != w.worker_id:
                return t
        return None

    def _grant(self, t: Task, w: WorkerInfo, *, speculative: bool, parked: bool
               ) -> tuple[Task, Lease]:
        now = time.monotonic()
        lease = Lease("l-" + secrets.token_hex(8), w.worker_id, now, now + self.lease_timeout_s,
                      parked)
        t.leases[lease.lease_id] = lease
        if not speculative:
            self.pending.remove(t.task_id)
        w.current_task = t.task_id
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
            w.touch()
            if w.quarantined or self.closing:
                return None
            t = self._pick_pending(w)
            if t is not None:
                return self._grant(t, w, speculative=False, parked=parked)
            t = self._pick_straggler(w)
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

    def complete(self, t: Task, lease_id: str, result: Any, *, tokens: int,
                 duration_s: float) -> None:
        lease = t.leases.pop(lease_id)
        w = self.workers.get(lease.worker_id)
        if w is not None:
            w.rejections_in_row = 0
            w.tasks_completed += 1
            w.tokens_processed += tokens
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
        self.pending.appendleft(t.task_id)
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
