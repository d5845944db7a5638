"""``forward_backward`` and ``forward``: a batch split into shards over the
workers; logprobs and loss sums come back per shard, and (backward) the shard
gradients are summed as they are accepted, then made durable and added to the
run's accumulator before the request answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from rewardsignal import tracing
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ingest.accept import off_loop, tensor_bytes
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.ops.shards import Shard, compute_shards, parts_of
from rewardsignal.coordinator.runs.accumulator import Contribution, Part, PartialSums
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services
from rewardsignal.data.examples import example_to_datum
from rewardsignal.data.types import Datum
from rewardsignal.losses import LOSS_FNS, check_loss_fn, check_loss_inputs

MAX_BATCH = 65_536
# A batch of token ids up to this many tokens is checked on the event loop (well
# under a millisecond); text, and larger batches, go to a thread.
INLINE_TOKENS = 16_384


def _small_token_batch(batch: list) -> bool:
    tokens = 0
    for x in batch:
        ids = x.get("model_input") if isinstance(x, dict) else None
        if not isinstance(ids, list):
            return False
        tokens += len(ids)
    return tokens <= INLINE_TOKENS


@dataclass(frozen=True)
class ForwardArgs:
    datums: list[Datum]
    loss_fn: str
    loss_fn_config: dict
    reduction: str


@dataclass
class Sharded:
    logprobs: list[Any]
    loss_sum: float
    weight_sum: float
    num_shards: int
    parts: dict[str, Part]  # by worker: what each computed (removable on quarantine)


async def shard_forward(ctx: Services, run: Run, request: Request, datums: list[Datum], *,
                        kind: str, version: int, loss_fn: str, loss_fn_config: dict,
                        sink: PartialSums | None) -> Sharded:
    """Split ``datums`` over the workers (forward passes at ``version``) and put
    the per-datum logprobs back in order; loss and weight sums added up."""
    plan = ctx.scheduler.plan_shards(datums, run.spec.base_model, run.run_id)
    shards = [Shard({"datums": [datums[i].to_json() for i in idx], "loss_fn": loss_fn,
                     "loss_fn_config": loss_fn_config},
                    sum(len(datums[i]) for i in idx), worker) for idx, worker in plan]
    outcomes = await compute_shards(ctx, run, request, shards, kind=kind, version=version,
                                    sink=sink)
    logprobs: list[Any] = [None] * len(datums)
    loss_sum = weight_sum = 0.0
    for (idx, _), o in zip(plan, outcomes, strict=True):
        for j, lp in zip(idx, o.result["logprobs"], strict=True):
            logprobs[j] = lp
        loss_sum += o.result["loss_sum"]
        weight_sum += o.result["weight_sum"]
    return Sharded(logprobs, loss_sum, weight_sum, len(shards), parts_of(shards, outcomes, sink))


class Forward(Operation):
    name = "forward"
    backward = False
    starts_unstored = True  # its shards go out at once; a gradient counts once stored

    async def parse(self, ctx: Services, run: Run, owner: str, body: Body) -> ForwardArgs:
        loss_fn = body.str("loss_fn", "cross_entropy", choices=LOSS_FNS)
        config = check_loss_fn(loss_fn, body.dict("loss_fn_config", {}))
        reduction = (body.str("reduction", "mean", choices=("mean", "sum")) if self.backward
                     else "mean")
        batch = body.list("batch", max_len=MAX_BATCH)
        # Tokenising (chat templates) is CPU work: off the event loop.
        datums = (ctx.tokenizers.datums(run, batch) if _small_token_batch(batch)
                  else await asyncio.to_thread(ctx.tokenizers.datums, run, batch))
        check_loss_inputs(loss_fn, [d.extra for d in datums])
        return ForwardArgs(datums, loss_fn, config, reduction)

    def dump(self, args: ForwardArgs) -> dict:
        return {"datums": [d.to_json() for d in args.datums], "loss_fn": args.loss_fn,
                "loss_fn_config": args.loss_fn_config, "reduction": args.reduction}

    def load(self, ctx: Services, run: Run, data: dict) -> ForwardArgs:
        tok = ctx.tokenizers.get(run.spec.base_model)
        return ForwardArgs([example_to_datum(d, tok) for d in data["datums"]], data["loss_fn"],
                           data["loss_fn_config"], data["reduction"])

    async def execute(self, ctx: Services, run: Run, request: Request,
                      args: ForwardArgs) -> dict:
        started = time.monotonic()
        datums = args.datums
        # Shard gradients are added into this sum as they are accepted (in the
        # submission path), so none of them waits around in memory.
        sink = PartialSums() if self.backward else None
        out = await shard_forward(ctx, run, request, datums, kind=self.name,
                                  version=run.version, loss_fn=args.loss_fn,
                                  loss_fn_config=args.loss_fn_config, sink=sink)
        num_tokens = sum(len(d) for d in datums)
        loss = out.loss_sum / out.weight_sum if out.weight_sum else 0.0
        result = {"loss": loss, "loss_sum": out.loss_sum, "weight_sum": out.weight_sum,
                  "num_tokens": num_tokens, "logprobs": out.logprobs, "version": run.version,
                  "num_shards": out.num_shards,
                  "datums": [d.to_json() for d in datums] if not self.backward else None}
        total = sink.total() if sink is not None else None
        if total is not None:
            await self._accumulate(ctx, run, request, Contribution(
                request.request_id, total, out.weight_sum, args.reduction, num_tokens,
                out.loss_sum, out.weight_sum, out.parts), result)
            ctx.metrics.fb_duration.labels(run.run_id).observe(time.monotonic() - started)
        run.last_loss = loss
        ctx.metrics.train_loss.labels(run.run_id).set(loss)
        return result

    async def _accumulate(self, ctx: Services, run: Run, request: Request,
                          c: Contribution, result: dict) -> None:
        # Durable before it counts: a restart finds this gradient and either adds
        # it back (not yet stepped) or drops it (already in a version). Staged
        # meanwhile: an ``optim_step`` behind it computes on it as it is written.
        # The request's result is stored with the gradient's row, in one
        # transaction: the step behind it waits for that (``until_prior_done``),
        # not for a second trip to the database.
        run.accum.stage(c)
        request.staged.set()
        try:
            await request.until_stored()
        except BaseException:
            run.accum.unstage(c)
            raise
        # Once its write has begun the gradient cannot be taken back (its thread
        # goes on): the request ends as that write does, done with the gradient
        # counted or failed without it, even if it is cancelled or times out
        # meanwhile (a timeout then waits the milliseconds the write takes). The
        # write starts here, before the loop turns to the step behind it.
        saving = ctx.pending.save(request_id=c.request_id, run_id=run.run_id,
                                  version=run.version, grads=c.grads, weight=c.weight,
                                  reduction=c.reduction, tokens=c.tokens, loss_sum=c.loss_sum,
                                  loss_weight=c.loss_weight, done=result,
                                  keep_args=self.replayable)
        await _despite_cancel(asyncio.ensure_future(
            self._count(ctx, run, request, c, result, saving)))

    async def _count(self, ctx: Services, run: Run, request: Request, c: Contribution,
                     result: dict, saving: Awaitable[None]) -> None:
        try:
            await saving
        except BaseException:
            run.accum.unstage(c)
            raise
        request.stored_result = result
        tracing.mark("coordinator: gradient durable")
        # One kernel call per worker's part for a flat gradient: on the loop
        # when small, as a submission's own sum is.
        await off_loop(tensor_bytes(c.grads), run.accum.add, c)
        # A worker quarantined while this was made durable: its part comes out now.
        for worker in sorted(c.workers()):
            if ctx.trust.is_quarantined(worker):
                run.accum.remove_worker(worker)
        ctx.metrics.tokens.labels(run.run_id).inc(c.tokens)


async def _despite_cancel(fut: asyncio.Future) -> None:
    """Wait for ``fut`` to end, even if the caller is cancelled meanwhile (it then
    carries on as if it had not been: what ``fut`` does cannot be undone); its
    error is raised."""
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            if fut.done():
                break
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
    fut.result()


class ForwardBackward(Forward):
    name = "forward_backward"
    backward = True

    def recovered(self, run: Run, request_id: str, manifest: dict) -> dict | None:
        if request_id not in run.recovered_grads:
            return None
        return {"recovered": True, "version": run.version,
                "note": "gradient kept across a coordinator restart; logprobs were lost"}
