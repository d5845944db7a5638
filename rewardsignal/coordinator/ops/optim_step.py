"""``optim_step``: AdamW on the gradient accumulated since the last step, then
version v+1.

The step is durable once its inputs are: the accepted gradients (``store.pending``)
and this request with its arguments (SQLite) were written before it ran. So v+1
becomes visible at once and its checkpoint is written in the background; a
crash before it lands is repaired by ``replay`` (the same AdamW on the same
gradients, in the same order), and the gradients are dropped only once the
checkpoint holds them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from rewardsignal import tracing
from rewardsignal.aggregation.optim import AdamWConfig, adamw_step
from rewardsignal.aggregation.tensors import global_norm
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ingest.accept import off_loop, tensor_bytes
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.ops.shards import settle_owed
from rewardsignal.coordinator.runs.accumulator import Accumulator
from rewardsignal.coordinator.runs.create import read_adamw
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.runs.versions import make_adapter_file_and_delta
from rewardsignal.coordinator.services import Services
from rewardsignal.errors import ValidationError

log = logging.getLogger("signal.coordinator")

# AdamW and the new version's file cost several times what a submission's check
# does per byte: a step runs on the event loop only for adapters under this
# (signal-tiny's 292 KiB: 1.3 ms in a step on a 2-core machine; 512 KiB about 2).
STEP_INLINE_BYTES = 512 << 10

_NOTHING = "nothing to apply: call forward_backward before optim_step"


class OptimStep(Operation):
    name = "optim_step"
    barrier = True
    starts_unstored = True  # AdamW runs while the request is synced; the version waits
    starts_on_staged = True  # ... and while the last gradient is written
    replayable = True

    async def parse(self, ctx: Services, run: Run, owner: str, body: Body) -> AdamWConfig:
        return read_adamw(body, run.spec.optimizer)

    def dump(self, args: AdamWConfig) -> dict:
        return {"optimizer": args.to_json()}

    def load(self, ctx: Services, run: Run, data: dict) -> AdamWConfig:
        return AdamWConfig(**data["optimizer"])

    def recovered(self, run: Run, request_id: str, manifest: dict) -> dict | None:
        # Its checkpoint landed just before the crash: answer from it.
        if manifest.get("request_id") != request_id:
            return None
        entry = run.history[-1] if run.history else {}
        return {"version": run.version, "loss": entry.get("loss"), "step": run.opt_step,
                "recovered": True}

    async def execute(self, ctx: Services, run: Run, request: Request,
                      args: AdamWConfig) -> dict:
        started = time.monotonic()
        # Shards taken out with a quarantined worker are recomputed first.
        await settle_owed(ctx, run, request)
        if run.accum.empty and not run.accum.staged:
            raise ValidationError(_NOTHING)

        async def until_durable() -> None:
            await request.until_stored()
            await request.until_prior_done()

        async def settle() -> None:
            await settle_owed(ctx, run, request)

        result = await self._apply(ctx, run, args, request.request_id, track=True,
                                   until_durable=until_durable, settle=settle, announce=False)
        ctx.metrics.steps.labels(run.run_id).inc()
        ctx.metrics.step_duration.labels(run.run_id).observe(time.monotonic() - started)
        log.info("step done run=%s version=%d loss=%s tokens=%d", run.run_id, run.version,
                 f"{result['loss']:.4f}" if result["loss"] is not None else "-",
                 run.history[-1]["tokens"])
        return result

    def answered(self, ctx: Services, run: Run) -> None:
        # The new version goes to waiting leases once the answer is on its way:
        # its push (a send of the delta, a fraction of a millisecond on the
        # loop) then follows the answer instead of going ahead of it, and the
        # worker still has until the next task comes to apply it. Also after a
        # failure: a version committed before it must not go unannounced.
        ctx.versions.announce()

    async def replay(self, ctx: Services, run: Run, args: AdamWConfig, request_id: str) -> dict:
        return await self._apply(ctx, run, args, request_id)

    async def _apply(self, ctx: Services, run: Run, args: AdamWConfig, request_id: str, *,
                     track: bool = False,
                     until_durable: Callable[[], Awaitable[None]] | None = None,
                     settle: Callable[[], Awaitable[None]] | None = None,
                     announce: bool = True) -> dict:
        """AdamW on the accumulated gradient, committed as the next version once
        ``until_durable()`` returns (this request and every gradient it applies
        are stored: a replay can rebuild the version before its checkpoint
        lands). AdamW runs on the gradients staged so far (``Accumulator.snapshot``)
        while they are written, and again if what lands is not what it ran on (a
        gradient that could not be stored; a worker taken out meanwhile, whose
        shards ``settle`` recomputes first)."""
        accum = run.accum
        snap = accum.snapshot()
        before = ctx.versions.adapter_bytes(run.run_id, run.version)

        nbytes = tensor_bytes(run.adapter)

        def gradient_and_adamw(of: Callable[[], Accumulator]) -> tuple:
            # The new version's file and its delta from this one too: what a
            # worker waiting for it is sent, ready when the version is.
            tracing.mark("coordinator: AdamW begins")
            grads = of().gradient()
            params, state, step = adamw_step(run.adapter, grads, run.opt_state, run.opt_step,
                                             args)
            tracing.mark("coordinator: AdamW done")
            made, delta = make_adapter_file_and_delta(params, before)
            tracing.mark("coordinator: new file and delta made")
            return grads, params, state, step, made, delta

        # The last gradient's writes go on beside it (in a thread; the fsync
        # needs no CPU). A small adapter's step runs on the loop, as a small
        # submission's check does (``off_loop``): a hop to a thread and back
        # costs more than its millisecond or two.
        out: tuple | None
        try:
            out = await off_loop(nbytes, gradient_and_adamw, snap.ahead,
                                 inline_below=STEP_INLINE_BYTES)
            tracing.mark("coordinator: AdamW and new file computed")
        except ValidationError:  # e.g. no loss weight staged: judged on what lands
            out = None
        if until_durable is not None:
            await until_durable()
            tracing.mark("coordinator: step's inputs durable")
        # Until what it computed on is what is there (each pass follows a change:
        # a gradient that did not land, a worker quarantined meanwhile).
        while out is None or (settle is not None and accum.owed) or not accum.matches(snap):
            if settle is not None and accum.owed:
                await settle()
            if accum.empty:
                raise ValidationError(_NOTHING + " (the forward_backward before it failed)")
            snap = accum.snapshot()
            out = await off_loop(nbytes, gradient_and_adamw, snap.ahead,
                                 inline_below=STEP_INLINE_BYTES)
        grads, params, state, step, adapter, delta = out
        loss = accum.loss
        entry = {"version": run.version + 1, "loss": loss, "tokens": accum.tokens,
                 "time": time.time()}
        # Keep any other state the run carries (a federated job's outer momentum);
        # without any, the new state stays one flat buffer.
        if set(run.opt_state) - set(state):
            state = {**run.opt_state, **state}
        run_id = run.run_id

        async def landed(version: int) -> None:
            await ctx.pending.drop_before(run_id, version)

        await ctx.versions.commit(run, params, state, history_entry=entry, opt_step=step,
                                  metrics={"loss": loss, "tokens": accum.tokens},
                                  request_id=request_id, background=landed, adapter=adapter,
                                  delta=delta, announce=announce)
        run.accum = Accumulator()
        tracing.mark("coordinator: version committed")
        if track and ctx.trackers.logs(run.run_id):
            # The accumulated gradient's norm (before clipping), for tracking.
            norm = await asyncio.to_thread(global_norm, grads)
            ctx.trackers.log(run.run_id, run.version, {
                "train/loss": loss, "train/tokens": entry["tokens"],
                "train/learning_rate": args.learning_rate, "train/grad_norm": norm})
        return {"version": run.version, "loss": loss, "step": step,
                "learning_rate": args.learning_rate}
