"""``evaluate``: mean cross-entropy loss and perplexity of held-out examples under
one version of the run (forward passes only, split over the workers like a
``forward``). Like ``compute_logprobs`` it reads the version it names (default:
the latest when accepted), changes nothing, and does not wait behind the run's
queue; unlike ``forward`` it leaves the run's train loss alone."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.ops.forward import MAX_BATCH, shard_forward
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services
from rewardsignal.data.examples import example_to_datum
from rewardsignal.data.types import Datum


@dataclass(frozen=True)
class EvaluateArgs:
    datums: list[Datum]
    version: int


class Evaluate(Operation):
    name = "evaluate"
    ordered = False

    async def parse(self, ctx: Services, run: Run, owner: str, body: Body) -> EvaluateArgs:
        version = body.int("version", run.version, lo=0, hi=run.version)
        datums = await asyncio.to_thread(ctx.tokenizers.datums, run,
                                         body.list("batch", max_len=MAX_BATCH))
        await ctx.versions.adapter_sha256(run.run_id, version)  # 404 if pruned
        return EvaluateArgs(datums, version)

    def dump(self, args: EvaluateArgs) -> dict:
        return {"datums": [d.to_json() for d in args.datums], "version": args.version}

    def load(self, ctx: Services, run: Run, data: dict) -> EvaluateArgs:
        tok = ctx.tokenizers.get(run.spec.base_model)
        return EvaluateArgs([example_to_datum(d, tok) for d in data["datums"]], data["version"])

    async def execute(self, ctx: Services, run: Run, request: Request,
                      args: EvaluateArgs) -> dict:
        out = await shard_forward(ctx, run, request, args.datums, kind="forward",
                                  version=args.version, loss_fn="cross_entropy",
                                  loss_fn_config={}, sink=None)
        loss = out.loss_sum / out.weight_sum if out.weight_sum else 0.0
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                "loss_sum": out.loss_sum, "weight_sum": out.weight_sum,
                "num_examples": len(args.datums),
                "num_tokens": sum(len(d) for d in args.datums), "version": args.version,
                "num_shards": out.num_shards}
