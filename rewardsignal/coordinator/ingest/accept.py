"""Acceptance of worker submissions: the lease is live, the pure checks pass
(in a thread), exactly one submission per task is claimed on the event loop,
and its gradient is summed where its request wants it. Rejections are counted
by reason, told to the job they hurt, and count towards quarantine."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass

from rewardsignal import tracing
from rewardsignal.aggregation.tensors import flat_buffer
from rewardsignal.aggregation.validate import UpdateLimits
from rewardsignal.coordinator.federated.job import FederatedJob
from rewardsignal.coordinator.ingest.checks import Checked, RunView, check_submission
from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.scheduling.holds import release
from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.scheduling.tasks import Task
from rewardsignal.coordinator.scheduling.workers import WorkerInfo
from rewardsignal.coordinator.trust.service import Trust
from rewardsignal.errors import ConflictError, RejectedUpdate
from rewardsignal.openmp import threads_for

log = logging.getLogger("signal.coordinator")

# Work on a submission smaller than this runs on the event loop (well under a
# millisecond); larger ones go to a thread. Each hop to a thread and back costs
# about a millisecond on a busy small machine, three of them per submission.
INLINE_BYTES = 1 << 20


async def off_loop(nbytes: int, fn, /, *args, inline_below: int = INLINE_BYTES, **kwargs):
    """``fn(*args, **kwargs)``, in a thread when it handles ``inline_below``
    bytes or more (with the intra-op threads that size gets:
    ``openmp.threads_for``)."""
    if nbytes < inline_below:
        return fn(*args, **kwargs)

    def sized():
        with threads_for(nbytes):
            return fn(*args, **kwargs)

    return await asyncio.to_thread(sized)


@dataclass
class Ingest:
    scheduler: Scheduler
    runs: dict[str, Run]
    jobs: dict[str, FederatedJob]
    metrics: Metrics
    limits: UpdateLimits
    rejections: Counter
    trust: Trust

    def _reject(self, reason: str) -> None:
        self.metrics.updates_rejected.labels(reason).inc()
        self.rejections[reason] += 1

    async def submit(self, worker: WorkerInfo, task_id: str, msg: dict) -> dict:
        if task_id in self.scheduler.finished:
            self.metrics.duplicates.inc()
            return {"status": "duplicate"}
        lease_id = str(msg.get("lease_id"))
        if self.trust.is_quarantined(worker.worker_id):
            # Found out while this was computed: nothing more of it counts.
            self._reject("quarantined")
            raise ConflictError(f"worker {worker.worker_id} is quarantined: "
                                f"{worker.quarantine_reason}", code="quarantined")
        try:
            task = self.scheduler.check_lease(task_id, lease_id, worker.worker_id)
        except ConflictError:
            self._reject("unknown_lease")
            raise
        if "error" in msg:
            error = str(msg.get("error"))[:500]
            log.warning("task failed on worker task=%s worker=%s error=%s", task_id,
                        worker.name, error)
            self.scheduler.release(task, lease_id, f"worker {worker.name}: {error}")
            return {"status": "released"}
        checked = await self._check(worker, task, lease_id, msg)
        tracing.mark("coordinator: result checked")
        if task.done or task.claimed:  # another lease won while this one was checked
            self.metrics.duplicates.inc()
            return {"status": "duplicate"}
        if lease_id not in task.leases:  # it expired, or its worker was withdrawn, meanwhile
            self._reject("unknown_lease")
            raise ConflictError(f"lease {lease_id} on task {task_id} ended while its result "
                                "was checked; the task went back to the queue",
                                code="unknown_lease")
        task.claimed = True  # claimed on the event loop: exactly one submission gets past here
        task.done_by = worker.worker_id
        # A result held for a check (``coordinator.trust``) counts only once it
        # agrees with another worker's: its gradient waits on the task, counted
        # against the memory for held results (the lease's share, made exact).
        task.check = task.checkable and self.trust.wants_check(worker, task.kind)
        # A check task's gradient is counted too, until its verdict (always granted).
        hold = self.scheduler.take_hold(task, lease_id)
        if (task.check or task.keep) and checked.tensors is not None:
            nbytes = tensor_bytes(checked.tensors)
            task.hold = (hold.resize(nbytes) if hold is not None
                         else self.scheduler.holds.take(nbytes))
        else:
            release(hold)
        if task.keep or task.check:
            task.held = checked.tensors
        elif task.sink is not None and checked.tensors is not None:
            await off_loop(tensor_bytes(checked.tensors), task.sink.add, checked.tensors, owned=True,
                           worker=worker.worker_id)
        duration_s = _duration(msg)
        self.scheduler.complete(task, lease_id, checked.result, tokens=task.tokens,
                                duration_s=duration_s)
        self.metrics.updates_accepted.labels(task.kind).inc()
        self.metrics.task_compute.labels(task.kind).observe(duration_s)
        return {"status": "accepted"}

    async def _check(self, worker: WorkerInfo, task: Task, lease_id: str, msg: dict) -> Checked:
        run = self.runs[task.run_id]
        view = RunView(run.spec.fingerprint, run.version, run.shapes)
        raw = msg.get("tensors")
        nbytes = len(raw) if isinstance(raw, bytes | memoryview) else 0
        if nbytes and task.kind in ("forward_backward", "train"):
            kind = "delta" if task.kind == "train" else "gradient"
            self.metrics.bytes_in.labels(kind, str(msg.get("codec", "fp32"))[:8]).inc(nbytes)
        del raw  # decoding drops the message's copy; this one must not outlive it
        try:
            checked = await off_loop(nbytes, check_submission, task, view, msg, self.limits)
        except RejectedUpdate as exc:
            job = self.jobs.get(task.job_id or "")
            if job is not None:
                job.note_rejection(exc.reason)
            self._reject(exc.reason)
            self.scheduler.note_rejection(worker, exc.reason)
            self.scheduler.release(task, lease_id, exc.message)
            log.warning("update rejected task=%s worker=%s reason=%s detail=%s", task.task_id,
                        worker.name, exc.reason, exc.detail)
            raise
        if checked.staleness is not None and checked.norm is not None:
            self.metrics.staleness.observe(checked.staleness)
            self.metrics.update_norm.observe(checked.norm)
        return checked


def tensor_bytes(tensors) -> int:
    """The bytes a set of tensors holds (what ``off_loop`` is told)."""
    flat = flat_buffer(tensors)
    if flat is not None:
        return flat.numel() * flat.element_size()
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _duration(msg: dict) -> float:
    d = msg.get("duration_s")
    return float(d) if isinstance(d, int | float) and not isinstance(d, bool) else 0.0
