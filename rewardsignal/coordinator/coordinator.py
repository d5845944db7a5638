"""The coordinator: a thin facade that wires its parts (``Services``) and owns
the lifecycle: recovery at start, each run's ordered processor, the ticker.

Domain work lives in the parts: operations in ``ops``, run state and versions
in ``runs``, rounds in ``federated``, tasks and leases in ``scheduling``,
submission checks in ``ingest``, disk and database in ``store``. HTTP lives in
``api``; blocking work goes through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewardsignal import tracing
from rewardsignal.coordinator import recovery
from rewardsignal.coordinator.catalog import ModelEntry
from rewardsignal.coordinator.config import CoordinatorConfig
from rewardsignal.coordinator.federated.job import FederatedJob
from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.monitor import Monitor
from rewardsignal.coordinator.ops import Operation, runner
from rewardsignal.coordinator.runs.create import RunRequest, build_run
from rewardsignal.coordinator.runs.processor import Op, RunProcessor
from rewardsignal.coordinator.runs.requests import Request, RequestRegistry
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.scheduling.placement import Requirement
from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.scheduling.workers import WorkerInfo
from rewardsignal.coordinator.services import Services
from rewardsignal.coordinator.store.db import NewRequest
from rewardsignal.errors import ConflictError, NotFoundError, SignalError, ValidationError
from rewardsignal.memory import gpu_config_memory_bytes
from rewardsignal.models import (
    BUILTIN_MODELS,
    is_available_locally,
    is_builtin,
    model_info,
    model_source,
)

log = logging.getLogger("signal.coordinator")


def _unstored_error(exc: BaseException) -> SignalError:
    return SignalError(f"the coordinator could not store the request ({exc}); nothing was "
                       "done: check its disk, then send the request again")


def _fail_unstored(req: Request, stored: asyncio.Future) -> None:
    exc = asyncio.CancelledError() if stored.cancelled() else stored.exception()
    if exc is None:
        return
    log.error("request not stored request=%s run=%s error=%r", req.request_id, req.run_id, exc)
    if not req.future.done():
        req.future.set_exception(_unstored_error(exc))


def _same_kind(key: str, first: str, now: str) -> None:
    if first != now:
        raise ConflictError(f"idempotency key {key!r} was already used for another kind of "
                            f"call ({first}, this one is {now}); send this call with a key "
                            "of its own", code="idempotency_key_reused")


def _describe(model_ids: list[str]) -> list[dict]:
    """Sizes of the models known here without a download (blocking)."""
    out = []
    for m in model_ids:
        try:
            out.append(model_info(m).to_json() if is_available_locally(m) else {})
        except Exception:  # an unreadable config is not this listing's problem
            out.append({})
    return out


class Coordinator:
    def __init__(self, config: CoordinatorConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.services = Services.build(config, self.metrics)
        self.ingest = self.services.ingest()
        self.monitor = Monitor(self.services.scheduler, self.services.upload_slots,
                               self.metrics)
        self._ticker: asyncio.Task | None = None
        # (owner, idempotency key) -> the answer of a call still being accepted
        self._claims: dict[tuple[str, str], tuple[str, asyncio.Future[dict]]] = {}
        self._forgotten: list[str] = []  # pruned workers still in the database

    # The parts most callers (and tests) reach for.
    @property
    def runs(self) -> dict[str, Run]:
        return self.services.runs

    @property
    def scheduler(self) -> Scheduler:
        return self.services.scheduler

    @property
    def jobs(self) -> dict[str, FederatedJob]:
        return self.services.jobs

    @property
    def requests(self) -> RequestRegistry:
        return self.services.requests

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.services.db.open()
        swept = await asyncio.to_thread(self.services.artifacts.sweep)
        if swept:
            log.info("removed %d half-done export folders", swept)
        await recovery.restore(self.services, self._adopt)
        await self.services.trust.restore()
        self._ticker = asyncio.create_task(self._tick_forever())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        await asyncio.gather(*[r.processor.stop() for r in self.runs.values() if r.processor])
        # Checkpoints still being written land before the database closes (a
        # restart would otherwise replay their steps: correct, but slower).
        await self.services.versions.flush()
        await asyncio.to_thread(self.services.trackers.close)
        await self.services.db.close()

    def _adopt(self, run: Run) -> None:
        async def execute(op: Op) -> None:
            await runner.execute(self.services, run, op)

        run.processor = RunProcessor(execute)
        run.processor.start()
        self.runs[run.run_id] = run
        spec = run.spec
        self.services.trackers.open(
            run.run_id, spec.log_to, run_dir=self.services.versions.store.run_dir(run.run_id),
            wandb_project=spec.wandb_project, config=spec.to_json())
        self.scheduler.place(run.run_id, Requirement(
            spec.base_model, spec.precision, run.shape, spec.lora.r, spec.lora.target_modules,
            spec.max_length,
            gpu_config_memory_bytes(spec.gpu_config) if spec.gpu_config else None))
        self.metrics.version.labels(run.run_id).set(run.version)

    async def _tick_forever(self) -> None:
        interval = self.config.tick_interval_s
        while True:
            due = time.monotonic() + interval
            await asyncio.sleep(interval)
            # How late the loop woke us: time every callback waits to be served.
            self.metrics.loop_lag.observe(max(0.0, time.monotonic() - due))
            self.tick()
            if self._forgotten:
                gone, self._forgotten = self._forgotten, []
                await self.services.db.delete_workers(gone)

    def tick(self) -> None:
        # Workers forgotten for good are deleted from the database by the ticker,
        # so that a restart does not bring them back.
        self._forgotten.extend(self.monitor.tick(self.config.worker_retention_s))

    # -- runs and requests -----------------------------------------------------------------
    async def once(self, owner: str, key: str | None, create: Callable[..., Awaitable[dict]],
                   *, kind: str, prepare: Callable[[], Awaitable[Any]] | None = None
                   ) -> tuple[dict, bool]:
        """``create()``'s answer, at most once per (owner, idempotency key): a
        retry with the same key gets the first call's answer back (and True),
        whether the first is done, still being accepted, or from before a
        restart. ``create`` must store the key with what it creates, as
        ``kind`` (``run``, ``request``, ``requests``): a key first used for
        another kind of call is a 409, not that call's answer. ``prepare``:
        what ``create`` is then given, made while the key is looked up in the
        database (reading and checking the body, with no effect of its own);
        a retry whose key is found gets its answer even if it fails."""
        if key is None:
            return await (create(await prepare()) if prepare is not None else create()), False
        claim = (owner, key)
        if claim in self._claims:
            first_kind, first = self._claims[claim]
            _same_kind(key, first_kind, kind)
            return await asyncio.shield(first), True
        # Claimed before the first await, so a concurrent retry waits for this one.
        fut: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
        self._claims[claim] = (kind, fut)
        try:
            found = await self._find_key_while(owner, key, prepare)
            if isinstance(found, _Prepared):
                answer, replayed = await create(found.value), False
            elif found is None:
                answer, replayed = await create(), False
            else:
                _same_kind(key, found["kind"], kind)
                run = self.runs.get(found["ref"]) if found["kind"] == "run" else None
                answer, replayed = (run.to_json() if run else found["answer"]), True
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            del self._claims[claim]
        fut.set_result(answer)
        return answer, replayed

    async def _find_key_while(self, owner: str, key: str,
                              prepare: Callable[[], Awaitable[Any]] | None
                              ) -> dict | _Prepared | None:
        """The key's record (None: not used before), looked up in the database
        while ``prepare()`` runs; a key not used before with ``prepare`` gives
        what it made. ``prepare``'s error is raised only for a new key."""
        finding = self.services.db.find_key_soon(owner, key)
        if prepare is None:
            return await finding
        try:
            value = await prepare()
        except asyncio.CancelledError:
            finding.cancel()
            raise
        except BaseException:
            if await finding is None:
                raise
            return await finding
        found = await finding
        return _Prepared(value) if found is None else found

    async def create_run(self, owner: str, req: RunRequest, idem_key: str | None = None) -> Run:
        start = None
        if req.init is not None and req.init.run_ref is not None:
            start = await self._version_weights(owner, req, *req.init.run_ref)
        run = await asyncio.to_thread(build_run, owner, req, start)
        await asyncio.to_thread(self.services.tokenizers.get, req.base_model)
        await self.services.versions.write(run)
        await self.services.db.save_run(run.run_id, owner, run.spec.to_json(), idem_key)
        self._adopt(run)
        log.info("run created run_id=%s base=%s lora_r=%d params=%d", run.run_id,
                 req.base_model, req.lora.r, sum(v.numel() for v in run.adapter.values()))
        return run

    async def delete_run(self, owner: str, run_id: str) -> dict:
        """Remove a run and everything it owns: its jobs (cancelled), open requests
        (failed), tasks, database rows (one transaction: the point of no return),
        checkpoints, saved states, pending gradients and metric series."""
        run = self.run_for(owner, run_id)
        jobs = [j for j in self.jobs.values() if j.run_id == run_id]
        for job in jobs:
            job.cancel()
        del self.runs[run_id]
        if run.processor is not None:
            await run.processor.stop()
        failed = self.requests.fail_run(run_id, NotFoundError(f"run {run_id} was deleted"))
        tasks = self.scheduler.forget_run(run_id)
        await self.services.versions.forget(run_id)
        for job in jobs:
            self.jobs.pop(job.job_id, None)
        paths = await self.services.db.delete_run(run_id)
        await asyncio.to_thread(self.services.trackers.close_run, run_id)
        await asyncio.to_thread(self._delete_files, run_id, paths, [j.job_id for j in jobs])
        self.metrics.forget_run(run_id)
        log.info("run deleted run_id=%s requests_failed=%d tasks_cancelled=%d", run_id, failed,
                 tasks)
        return {"run_id": run_id, "deleted": True, "requests_failed": failed,
                "jobs_cancelled": len(jobs)}

    def _delete_files(self, run_id: str, pending: list[str], job_ids: list[str]) -> None:
        s = self.services
        s.artifacts.delete_run(run_id)
        shutil.rmtree(s.versions.store.run_dir(run_id), ignore_errors=True)
        shutil.rmtree(s.pending.root / run_id, ignore_errors=True)
        for path in [*pending, *(str(s.job_store.datums_path(j)) for j in job_ids)]:
            Path(path).unlink(missing_ok=True)

    async def _version_weights(self, owner: str, req: RunRequest, run_id: str,
                               version: int) -> dict:
        """The adapter of one of the caller's run versions, to start a new run from."""
        src = self.run_for(owner, run_id)
        if src.spec.base_model != req.base_model:
            raise ValidationError(f"{run_id} was trained on {src.spec.base_model!r}, not "
                                  f"{req.base_model!r}")
        if version > src.version:
            raise NotFoundError(f"{run_id} has no version {version} (it is at {src.version})")
        await self.services.versions.flush(run_id)  # a version may still be being written
        ck = await asyncio.to_thread(self.services.versions.store.load, run_id, version)
        return ck.adapter

    def run_for(self, owner: str, run_id: str) -> Run:
        run = self.runs.get(run_id)
        # Another user's run is indistinguishable from a missing one.
        if run is None or run.spec.owner != owner:
            raise NotFoundError(f"unknown run {run_id}")
        return run

    def runs_of(self, owner: str) -> list[Run]:
        return [r for r in self.runs.values() if r.spec.owner == owner]

    async def submit(self, owner: str, run: Run, operation: Operation, args: Any,
                     timeout_s: float | None, idem_key: str | None = None, *,
                     request_id: str | None = None) -> dict:
        """Accept an operation: it is written to the database (with its
        idempotency key) before the caller hears 202, so a restart re-runs it and
        a retry finds it. Returns the 202 answer.

        It is queued while that write is synced (about a millisecond per request
        on the step's path otherwise): an operation that ``starts_unstored``
        changes nothing durable before ``request.until_stored()``, and every
        other one starts only then. The write is queued first, so it lands before
        anything the operation writes to the database. If it fails, the request
        fails with nothing done and the caller hears why.
        ``request_id``: one the caller handed out already (a front end whose
        clients learn the id before the operation is queued)."""
        extra = await operation.accept(self.services, run, owner, args)
        answers = await self._queue(owner, run, [(operation, args, extra)], timeout_s,
                                    idem_key, request_id=request_id, batch=False)
        return answers[0]

    async def submit_all(self, owner: str, run: Run, steps: Sequence[tuple[Operation, Any]],
                         timeout_s: float | None, idem_key: str | None = None) -> list[dict]:
        """Accept several operations on one run as ``submit`` accepts one: in one
        database transaction (all of them or none, one sync), queued in their
        order, so each starts as if its caller had waited for the one before to
        be accepted. Their operations have no side effects at acceptance
        (``Operation.pipelined``). Returns each one's 202 answer."""
        return await self._queue(owner, run, [(op, args, {}) for op, args in steps], timeout_s,
                                 idem_key, request_id=None, batch=True)

    async def _queue(self, owner: str, run: Run, steps: list[tuple[Operation, Any, dict]],
                     timeout_s: float | None, idem_key: str | None, *,
                     request_id: str | None, batch: bool) -> list[dict]:
        assert request_id is None or len(steps) == 1, "a given request id names one request"
        timeout_s = timeout_s or self.config.request_timeout_s
        reqs = [self.services.requests.create(owner, run.run_id, op.name, request_id=request_id)
                for op, _, _ in steps]
        answers = [{**req.to_json(), **extra} for req, (_, _, extra) in zip(reqs, steps, strict=True)]
        stored = self.services.db.add_requests(
            owner, run.run_id, [NewRequest(req.request_id, op.name, op.dump(args), timeout_s)
                                for req, (op, args, _) in zip(reqs, steps, strict=True)],
            idem_key=idem_key, key_kind="requests" if batch else "request",
            answer={"requests": answers} if batch else answers[0])
        assert run.processor is not None
        for req, (op, args, _) in zip(reqs, steps, strict=True):
            req.stored = stored
            # The request fails if it cannot be stored, whether or not this caller
            # is still there to hear it (a client that disconnects does not unmake it).
            stored.add_done_callback(functools.partial(_fail_unstored, req))
            run.processor.put(Op(op, req, args, timeout_s))
        tracing.mark("coordinator: queued")
        try:
            await asyncio.shield(stored)
        except Exception as exc:
            raise _unstored_error(exc) from exc
        tracing.mark("coordinator: requests stored")
        return answers

    async def register_worker(self, *, name: str, device: str, hardware: dict,
                              max_tokens_per_task: int, models: tuple[str, ...] | None,
                              capabilities: dict | None = None, token_id: str = ""
                              ) -> WorkerInfo:
        w = self.services.scheduler.register(
            name=name, device=device, hardware=hardware, max_tokens_per_task=max_tokens_per_task,
            models=models, capabilities=capabilities, token_id=token_id)
        await self.services.db.save_worker(w.worker_id, name, {
            "name": name, "device": device, "hardware": hardware,
            "max_tokens_per_task": max_tokens_per_task,
            "models": list(models) if models is not None else None,
            "capabilities": w.capabilities(), "token_id": token_id})
        return w

    async def models(self) -> list[dict]:
        """The base models this coordinator serves (the models file, or the
        built-ins without one): id, size, where it comes from, and how many live
        workers can serve it and have loaded it."""
        catalog = self.config.models
        entries = catalog.entries if catalog is not None else tuple(
            ModelEntry(m) for m in BUILTIN_MODELS)
        infos = await asyncio.to_thread(_describe, [e.name for e in entries])
        live = [w for w in self.scheduler.workers.values() if w.active]
        return [{"param_count": None, **info, **e.to_json(), "model_id": e.name, "source": model_source(e.name),
                 "builtin": is_builtin(e.name),
                 "workers_able": sum(w.serves(e.name) for w in live),
                 "workers_loaded": sum(e.name in w.bases_loaded for w in live)}
                for e, info in zip(entries, infos, strict=True)]

    def placement_warnings(self, run: Run) -> list[str]:
        """What a new run's creator should know about where it can run: said, not
        refused, since volunteers may join later."""
        warnings = []
        spec = run.spec
        if spec.gpu_config and gpu_config_memory_bytes(spec.gpu_config) is None:
            warnings.append(f"gpu_config {spec.gpu_config!r}: unknown GPU, so no memory "
                            "minimum was taken from it (name its size, e.g. 'A100-80GB:2')")
        live = [w for w in self.scheduler.workers.values() if w.active]
        reasons = {w.name: self.scheduler.refusal(w, run.run_id, spec.base_model)
                   for w in live}
        if not any(r is None for r in reasons.values()):
            why = "; ".join(f"{name}: {r}" for name, r in sorted(reasons.items())[:8])
            warnings.append(
                f"no registered worker can host run {run.run_id} ({spec.base_model} at "
                f"{spec.precision.label()}) " + (f"({why})" if why else "(none is registered)")
                + "; its requests wait for one that can (start `signal-worker` on a box with "
                "enough memory" + (", with bitsandbytes on CUDA" if spec.precision.quantization
                                   else "") + ")")
        return warnings

    def status(self, owner: str) -> dict:
        """Everything the dashboard shows, scoped to the caller's runs and jobs."""
        jobs = [j.to_json() for j in self.jobs.values() if j.owner == owner]
        for j in jobs:
            j.pop("config", None)
        runs = self.runs_of(owner)
        workers = []
        for w in self.scheduler.workers.values():
            # Which of the caller's runs this worker can serve, and why not the others.
            why = {r.run_id: self.scheduler.refusal(w, r.run_id, r.spec.base_model)
                   for r in runs}
            workers.append({**w.to_json(), "reputation": self.services.trust.state(w),
                            "can_serve": [k for k, v in why.items() if v is None],
                            "cannot_serve": {k: v for k, v in why.items() if v is not None}})
        able = {r.run_id: sum(1 for w in workers if w["status"] in ("idle", "busy")
                              and r.run_id in w["can_serve"]) for r in runs}
        return {"runs": [{**r.to_json(), "eligible_workers": able[r.run_id]} for r in runs],
                "workers": workers,
                "jobs": jobs[-50:], "rejections": dict(self.services.rejections),
                "tasks": self.scheduler.counts(), "time": time.time()}


@dataclass(frozen=True)
class _Prepared:
    """What ``Coordinator.once``'s ``prepare`` made, for a key not used before."""

    value: Any
