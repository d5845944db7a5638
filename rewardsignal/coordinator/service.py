"""The coordinator's domain logic: runs, their ordered operations, and the
acceptance of worker submissions. HTTP lives in ``routes``; tensor math in
``rewardsignal.aggregation``; blocking work goes through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewardsignal.aggregation.optim import AdamWConfig, adamw_step
from rewardsignal.aggregation.validate import UpdateLimits
from rewardsignal.checkpoints import CheckpointStore, export_adapter, export_merged
from rewardsignal.checkpoints.store import sha256_file
from rewardsignal.coordinator.config import CoordinatorConfig
from rewardsignal.coordinator.datasets import DatasetStore
from rewardsignal.coordinator.db import Database
from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.requests import Request, RequestRegistry
from rewardsignal.coordinator.runs import Accumulator, Run, RunRecords, RunSpec, new_run_id
from rewardsignal.coordinator.scheduler import Scheduler, Task
from rewardsignal.coordinator.slots import UploadSlots
from rewardsignal.data.examples import examples_to_datums
from rewardsignal.data.types import Datum
from rewardsignal.errors import (
    ConflictError,
    NotFoundError,
    NoWorkerError,
    RequestTimeoutError,
    SignalError,
    ValidationError,
)

log = logging.getLogger("signal.coordinator")

# forward passes of one run computed at once: each holds one adapter-sized partial
# sum until it completes, so this bounds coordinator memory per run.
_MAX_INFLIGHT_PER_RUN = 4
# Operations that change the run's weights wait for everything queued before them.
_BARRIERS = ("optim_step", "save_state", "train_federated")


@dataclass
class Op:
    kind: str
    request: Request
    args: dict[str, Any]
    timeout_s: float


class Coordinator:
    def __init__(self, config: CoordinatorConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        root = Path(config.data_dir)
        self.store = CheckpointStore(config.checkpoints_root, keep_last=config.keep_last_checkpoints)
        self.records = RunRecords(self.store)
        self.db = Database(root / "signal.db")
        self.pending_dir = root / "pending"
        self.artifacts_dir = root / "artifacts"
        self.scheduler = Scheduler(
            lease_timeout_s=config.lease_timeout_s, max_attempts=config.max_task_attempts,
            default_task_tokens=config.default_task_tokens,
            straggler_factor=config.straggler_factor, straggler_min_s=config.straggler_min_s,
            quarantine_after=config.quarantine_after, quarantine_s=config.quarantine_s,
            metrics=self.metrics)
        self.limits = UpdateLimits(config.max_staleness, config.delta_norm_max)
        self.runs: dict[str, Run] = {}
        self.requests = RequestRegistry()
        self.jobs: dict[str, Any] = {}
        self.datasets = DatasetStore(root / "datasets")
        self._tokenizers: dict[str, Any] = {}
        self._ticker: asyncio.Task | None = None
        self._was_active: dict[str, bool] = {}
        self._shown_workers: set[str] = set()  # names with per-worker series
        self.rejections: Counter = Counter()
        self.upload_slots = UploadSlots(config.upload_slots)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        from rewardsignal.coordinator.recovery import restore

        await self.db.open()
        await restore(self)
        self._ticker = asyncio.create_task(self._tick_forever())

    async def stop(self) -> None:
        tasks = [r.processor for r in self.runs.values() if r.processor] + [self._ticker]
        for t in tasks:
            if t is not None:
                t.cancel()
        await asyncio.gather(*[t for t in tasks if t is not None], return_exceptions=True)
        await self.db.close()

    def _adopt(self, run: Run) -> None:
        run.ops = asyncio.Queue()
        run.processor = asyncio.create_task(self._process(run))
        self.runs[run.run_id] = run
        self.metrics.version.labels(run.run_id).set(run.version)

    async def _tick_forever(self) -> None:
        interval = self.config.tick_interval_s
        while True:
            due = time.monotonic() + interval
            await asyncio.sleep(interval)
            # How late the loop woke us: time every callback waits to be served.
            self.metrics.loop_lag.observe(max(0.0, time.monotonic() - due))
            self.tick()

    def tick(self) -> None:
        self.scheduler.expire_leases()
        self.upload_slots.expire()
        counts = self.scheduler.counts()
        self.metrics.tasks_pending.set(counts["pending"])
        self.metrics.tasks_leased.set(counts["leased"])
        ws = list(self.scheduler.workers.values())
        self.metrics.workers.labels("registered").set(len(ws))
        self.metrics.workers.labels("active").set(sum(w.active for w in ws))
        self.metrics.workers.labels("quarantined").set(sum(w.quarantined for w in ws))
        # Per-worker series: set for active workers, removed for those that left
        # (not cleared and rebuilt: creating 2,000 children took 11 ms a tick with
        # 1,000 workers, longer while submission threads hold the GIL).
        shown = {w.name for w in ws if w.active}
        for name in self._shown_workers - shown:
            self.metrics.worker_tasks.remove(name)
            self.metrics.worker_rate.remove(name)
        self._shown_workers = shown
        for w in ws:
            if w.active:
                self.metrics.worker_tasks.labels(w.name).set(w.tasks_completed)
                self.metrics.worker_rate.labels(w.name).set(w.tokens_per_s or 0.0)
            if w.active != self._was_active.get(w.worker_id, True):
                log.info("worker %s id=%s name=%s", "joined" if w.active else "left",
                         w.worker_id, w.name)
            self._was_active[w.worker_id] = w.active

    # -- runs ------------------------------------------------------------------------------
    def tokenizer(self, model_id: str):
        if model_id not in self._tokenizers:
            from rewardsignal.models import load_tokenizer

            self._tokenizers[model_id] = load_tokenizer(model_id)
        return self._tokenizers[model_id]

    async def create_run(self, owner: str, spec_args: dict) -> Run:
        from rewardsignal.lora import adapter_shapes, init_adapter
        from rewardsignal.models import fingerprint

        base = spec_args["base_model"]
        lora = spec_args["lora"]
        fp = await asyncio.to_thread(fingerprint, base)
        await asyncio.to_thread(self.tokenizer, base)
        shapes = await asyncio.to_thread(adapter_shapes, base, lora)
        adapter = await asyncio.to_thread(init_adapter, base, lora)
        spec = RunSpec(new_run_id(), owner, base, fp, lora, spec_args["optimizer"],
                       spec_args["max_length"], time.time())
        run = Run(spec=spec, version=0, adapter=adapter, opt_state={}, opt_step=0,
                  shapes=dict(shapes))
        await self._write_checkpoint(run)
        await self.db.save_run(spec.run_id, owner, spec.to_json())
        self._adopt(run)
        log.info("run created run_id=%s base=%s lora_r=%d params=%d", spec.run_id, base, lora.r,
                 sum(v.numel() for v in adapter.values()))
        return run

    def run_for(self, owner: str, run_id: str) -> Run:
        run = self.runs.get(run_id)
        # Another user's run is indistinguishable from a missing one.
        if run is None or run.spec.owner != owner:
            raise NotFoundError(f"unknown run {run_id}")
        return run

    def runs_of(self, owner: str) -> list[Run]:
        return [r for r in self.runs.values() if r.spec.owner == owner]

    def status(self, owner: str) -> dict:
        """Everything the dashboard shows, scoped to the caller's runs and jobs."""
        jobs = [j.to_json() for j in self.jobs.values() if j.owner == owner]
        for j in jobs:
            j.pop("config", None)
        return {"runs": [r.to_json() for r in self.runs_of(owner)],
                "workers": [w.to_json() for w in self.scheduler.workers.values()],
                "jobs": jobs[-50:], "rejections": dict(self.rejections),
                "tasks": self.scheduler.counts(), "time": time.time()}

    def to_datums(self, run: Run, batch: list, name: str = "batch") -> list[Datum]:
        return examples_to_datums(batch, self.tokenizer(run.spec.base_model),
                                  max_length=run.spec.max_length, name=name)

    async def enqueue(self, owner: str, run: Run, kind: str, args: dict,
                      timeout_s: float | None) -> Request:
        """Accept an operation: it is written to the database before it is queued
        (and before the caller hears 202), so a restart re-runs it."""
        from rewardsignal.coordinator.recovery import args_to_json

        req = self.requests.create(owner, run.run_id, kind)
        timeout_s = timeout_s or self.config.request_timeout_s
        await self.db.add_request(req.request_id, owner, run.run_id, kind,
                                  args_to_json(kind, args), timeout_s)
        run.ops.put_nowait(Op(kind, req, args, timeout_s))
        return req

    # -- ordered processing ----------------------------------------------------------------
    async def _process(self, run: Run) -> None:
        """Apply a run's operations in the order they were accepted. Forward
        passes overlap (gradients add commutatively, and all of them see the same
        version); ``optim_step`` and ``save_state`` wait for everything before."""
        inflight: set[asyncio.Task] = set()
        while True:
            op: Op = await run.ops.get()
            if op.kind in _BARRIERS and inflight:
                await asyncio.wait(inflight)
            while len(inflight) >= _MAX_INFLIGHT_PER_RUN:
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            t = asyncio.create_task(self._execute(run, op))
            if op.kind in _BARRIERS:
                await t
            else:
                inflight.add(t)
                t.add_done_callback(inflight.discard)

    async def _execute(self, run: Run, op: Op) -> None:
        handler = {"forward_backward": self._forward_backward, "forward": self._forward_backward,
                   "optim_step": self._optim_step, "sample": self._sample,
                   "save_state": self._save_state,
                   "train_federated": self._train_federated}[op.kind]
        fut = op.request.future
        try:
            # A federated job bounds itself (rounds x round timeout, attempts).
            timeout = None if op.kind == "train_federated" else op.timeout_s
            result = await asyncio.wait_for(handler(run, op), timeout)
        except TimeoutError:
            base = run.spec.base_model
            if not self.scheduler.eligible_workers(base):
                err: SignalError = NoWorkerError(
                    f"no worker can serve base model {base}: none connected within "
                    f"{op.timeout_s:g}s. Start one with `signal-worker --coordinator URL`.")
            else:
                err = RequestTimeoutError(f"{op.kind} did not finish within {op.timeout_s:g}s")
            log.warning("request failed request=%s run=%s reason=%s", op.request.request_id,
                        run.run_id, err.code)
            if not fut.done():
                fut.set_exception(err)
        except SignalError as exc:
            if not fut.done():
                fut.set_exception(exc)
        except Exception as exc:  # a bug, not bad input: log it fully, fail only this request
            log.exception("request crashed request=%s run=%s", op.request.request_id, run.run_id)
            if not fut.done():
                fut.set_exception(SignalError(f"internal error: {type(exc).__name__}: {exc}"))
        else:
            if not fut.done():
                fut.set_result(result)
        body = op.request.to_json()
        await self.db.finish_request(op.request.request_id, body["status"],
                                     body.get("result") if body["status"] == "done"
                                     else {"error": body["error"]})

    async def _gather_tasks(self, tasks: list[Task]):
        """Yield (index, result) as tasks finish; cancel the rest on exit."""
        index = {t.future: i for i, t in enumerate(tasks)}
        pending = set(index)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for f in done:
                    yield index[f], f.result()
        finally:
            for t in tasks:
                if not t.done:
                    self.scheduler.cancel(t, "request ended")

    def _task_payload(self, run: Run) -> dict:
        return {"run_id": run.run_id, "base_model": run.spec.base_model,
                "version": run.version}

    async def _forward_backward(self, run: Run, op: Op) -> dict:
        started = time.monotonic()
        datums: list[Datum] = op.args["datums"]
        backward = op.kind == "forward_backward"
        plan = self.scheduler.plan_shards(datums, run.spec.base_model)
        # Shard gradients are added into this sum as they are accepted (in the
        # submission path), so none of them waits around in memory.
        sink = GradientSum() if backward else None
        tasks = [self.scheduler.add_task(
            kind=op.kind, **self._task_payload(run), tokens=sum(len(datums[i]) for i in idx),
            preferred_worker=worker, sink=sink,
            payload={"datums": [datums[i].to_json() for i in idx], "loss_fn": op.args["loss_fn"],
                     "loss_fn_config": op.args["loss_fn_config"]})
            for idx, worker in plan]
        logprobs: list[Any] = [None] * len(datums)
        loss_sum = weight_sum = 0.0
        async for i, res in self._gather_tasks(tasks):
            for j, lp in zip(plan[i][0], res["logprobs"], strict=True):
                logprobs[j] = lp
            loss_sum += res["loss_sum"]
            weight_sum += res["weight_sum"]
        grads = sink.value() if backward else None
        loss = loss_sum / weight_sum if weight_sum else 0.0
        num_tokens = sum(len(d) for d in datums)
        if backward:
            # Durable before it counts: a restart finds this gradient and either
            # adds it back (not yet stepped) or drops it (already in a version).
            path = self.pending_dir / run.run_id / f"{op.request.request_id}.safetensors"
            await asyncio.to_thread(_save_tensors, grads, path)
            await self.db.add_pending_grad({
                "request_id": op.request.request_id, "run_id": run.run_id,
                "version": run.version, "path": str(path), "weight": weight_sum,
                "reduction": op.args["reduction"], "loss_sum": loss_sum,
                "loss_weight": weight_sum, "tokens": num_tokens})
            await asyncio.to_thread(run.accum.add, grads, weight_sum, op.args["reduction"])
            run.accum.calls += 1
            run.accum.tokens += num_tokens
            run.accum.loss_sum += loss_sum
            run.accum.loss_weight += weight_sum
            self.metrics.fb_duration.labels(run.run_id).observe(time.monotonic() - started)
            self.metrics.tokens.labels(run.run_id).inc(num_tokens)
        run.last_loss = loss
        self.metrics.train_loss.labels(run.run_id).set(loss)
        return {"loss": loss, "loss_sum": loss_sum, "weight_sum": weight_sum,
                "num_tokens": num_tokens, "logprobs": logprobs, "version": run.version,
                "num_shards": len(tasks),
                "datums": [d.to_json() for d in datums] if not backward else None}

    async def _optim_step(self, run: Run, op: Op) -> dict:
        started = time.monotonic()
        if run.accum.empty:
            raise ValidationError("nothing to apply: call forward_backward before optim_step")
        cfg: AdamWConfig = op.args["optimizer"]
        accum = run.accum
        grads = await asyncio.to_thread(accum.gradient)
        params, state, step = await asyncio.to_thread(adamw_step, run.adapter, grads,
                                                      run.opt_state, run.opt_step, cfg)
        loss = accum.loss_sum / accum.loss_weight if accum.loss_weight else None
        entry = {"version": run.version + 1, "loss": loss, "tokens": accum.tokens,
                 "time": time.time()}
        # Keep any other state the run carries (a federated job's outer momentum).
        state = {**run.opt_state, **state}
        await self.commit_version(run, params, state, history_entry=entry, opt_step=step,
                                  metrics={"loss": loss, "tokens": accum.tokens},
                                  request_id=op.request.request_id)
        run.accum = Accumulator()
        for stale in await self.db.drop_pending_grads(run.run_id, run.version):
            Path(stale).unlink(missing_ok=True)
        self.metrics.steps.labels(run.run_id).inc()
        self.metrics.step_duration.labels(run.run_id).observe(time.monotonic() - started)
        log.info("step done run=%s version=%d loss=%s tokens=%d", run.run_id, run.version,
                 f"{loss:.4f}" if loss is not None else "-", entry["tokens"])
        return {"version": run.version, "loss": loss, "step": step,
                "learning_rate": cfg.learning_rate}

    async def commit_version(self, run: Run, params, state, *, history_entry: dict,
                             opt_step: int | None = None, metrics: dict | None = None,
                             request_id: str | None = None) -> Path:
        """Make version v+1 from new weights and optimizer state. The checkpoint
        is written before the version becomes visible: a crash in between leaves
        the old version current and this one unannounced."""
        staged = dataclasses.replace(
            run, version=run.version + 1, adapter=params, opt_state=state,
            opt_step=run.opt_step if opt_step is None else opt_step,
            history=[*run.history, history_entry])
        path = await self._write_checkpoint(
            staged, metrics=metrics or {"loss": history_entry.get("loss")},
            request_id=request_id)
        run.version, run.adapter, run.opt_state, run.opt_step = (
            staged.version, params, state, staged.opt_step)
        run.history.append(history_entry)
        if history_entry.get("loss") is not None:
            run.last_loss = history_entry["loss"]
        self.metrics.version.labels(run.run_id).set(run.version)
        return path

    async def _train_federated(self, run: Run, op: Op) -> dict:
        from rewardsignal.coordinator.federated import run_job

        job = self.jobs[op.args["job_id"]]
        if job.cancel_requested:
            job.status = "cancelled"
            job.reason = "cancelled before it started"
            return job.to_json()
        if not run.accum.empty:
            log.warning("run %s: a federated job starts with un-stepped gradients; they "
                        "are kept for the next optim_step", run.run_id)
        return await run_job(self, run, job)

    async def save_job(self, job) -> None:
        """Persist a federated job's progress (its datums are written once)."""
        from rewardsignal.coordinator.recovery import job_datums_path

        path = job_datums_path(self, job.job_id)
        if not path.exists():
            def write() -> None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"train": [d.to_json() for d in job.train],
                                           "eval": [d.to_json() for d in job.eval]}))
                tmp.replace(path)

            await asyncio.to_thread(write)
        await self.db.save_job(job.job_id, job.run_id, job.owner, job.state())

    async def _write_checkpoint(self, run: Run, metrics: dict | None = None,
                                request_id: str | None = None) -> Path:
        t0 = time.monotonic()
        path = await asyncio.to_thread(self.records.write_checkpoint, run, metrics=metrics,
                                       request_id=request_id)
        self.metrics.checkpoint_seconds.observe(time.monotonic() - t0)
        self.metrics.checkpoint_bytes.labels(run.run_id).set(
            sum(p.stat().st_size for p in path.iterdir()))
        return path

    async def _sample(self, run: Run, op: Op) -> dict:
        prompts: list[list[int]] = op.args["prompt_tokens"]
        task = self.scheduler.add_task(
            kind="sample", **self._task_payload(run), tokens=sum(map(len, prompts)),
            payload={k: op.args[k] for k in ("prompt_tokens", "max_tokens", "temperature",
                                             "top_p", "seed")})
        async for _, res in self._gather_tasks([task]):
            outs = res["outputs"]
            return {"outputs": [o["text"] for o in outs], "tokens": [o["tokens"] for o in outs],
                    "logprobs": [o["logprobs"] for o in outs], "version": run.version}
        raise AssertionError("unreachable")

    async def _save_state(self, run: Run, op: Op) -> dict:
        mode = op.args["mode"]
        name = op.args.get("name") or (f"v{run.version:06d}" + ("-merged" if mode == "merged"
                                                                  else ""))
        # Pinning keeps the full checkpoint (optimizer state too) past retention.
        self.store.pin(run.run_id, run.version, name)
        out = self.artifacts_dir / run.run_id / name
        meta_file = out / "artifact.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            if meta["version"] != run.version or meta["mode"] != mode:
                raise ConflictError(f"artifact {name!r} already holds version "
                                    f"{meta['version']} ({meta['mode']}); pick another name")
            return meta
        src = self.store.path(run.run_id, run.version)
        tmp = out.with_name(f".tmp-{name}")
        if mode == "merged":
            await asyncio.to_thread(export_merged, src, run.spec.base_model, tmp)
        else:
            await asyncio.to_thread(export_adapter, src, tmp)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        meta = {"name": name, "run_id": run.run_id, "version": run.version, "mode": mode,
                "checkpoint_path": f"signal://{run.run_id}/{name}",
                "files": [{"path": p.name, "bytes": p.stat().st_size,
                           "sha256": await asyncio.to_thread(sha256_file, p)} for p in files]}
        (tmp / "artifact.json").write_text(json.dumps(meta, indent=2))
        tmp.replace(out)
        log.info("state saved run=%s version=%d name=%s mode=%s", run.run_id, run.version, name,
                 mode)
        return meta

    def artifact(self, run: Run, name: str) -> tuple[dict, Path]:
        out = self.artifacts_dir / run.run_id / name
        if "/" in name or name.startswith(".") or not (out / "artifact.json").is_file():
            raise NotFoundError(f"run {run.run_id} has no saved state named {name!r}")
        return json.loads((out / "artifact.json").read_text()), out

def _save_tensors(tensors, path: Path) -> None:
    import os

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class GradientSum:
    """Thread-safe running sum of shard gradients of one forward_backward."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sum: dict | None = None

    def add(self, grads: dict) -> None:
        with self._lock:
            if self._sum is None:
                self._sum = grads
            else:
                for k, v in grads.items():
                    self._sum[k].add_(v)

    def value(self) -> dict:
        assert self._sum is not None, "every shard was accepted, so the sum exists"
        return self._sum
