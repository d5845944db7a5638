"""``compute_logprobs``: per-token logprobs of given token sequences under one
version of the run (forward passes only), split over the workers like a
``forward``. Each sequence's answer starts with None (its first token has
nothing before it). Like ``sample`` it reads the version it names (default: the
latest when accepted) and does not wait behind the run's queue."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.ops.forward import shard_forward
from rewardsignal.coordinator.ops.sample import MAX_PROMPTS, check_token_lists, context_length
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services
from rewardsignal.data.types import Datum
from rewardsignal.errors import ValidationError


@dataclass(frozen=True)
class LogprobArgs:
    sequences: list[list[int]]
    version: int


def _read(body: Body, vocab: int, run: Run) -> LogprobArgs:
    seqs = check_token_lists(body.list("sequences", max_len=MAX_PROMPTS), vocab, "sequences")
    limit = context_length(run.spec.base_model)
    if max(map(len, seqs)) > limit:
        raise ValidationError(f"a sequence is longer than the model's context of {limit} tokens")
    return LogprobArgs(seqs, body.int("version", run.version, lo=0, hi=run.version))


class ComputeLogprobs(Operation):
    name = "compute_logprobs"
    ordered = False
    starts_unstored = True  # changes nothing

    async def parse(self, ctx: Services, run: Run, owner: str, body: Body) -> LogprobArgs:
        tok = await asyncio.to_thread(ctx.tokenizers.get, run.spec.base_model)
        args = _read(body, len(tok), run)
        await ctx.versions.adapter_sha256(run.run_id, args.version)  # 404 if pruned
        return args

    def dump(self, args: LogprobArgs) -> dict:
        return {"sequences": args.sequences, "version": args.version}

    def load(self, ctx: Services, run: Run, data: dict) -> LogprobArgs:
        return LogprobArgs(data["sequences"], data["version"])

    async def execute(self, ctx: Services, run: Run, request: Request,
                      args: LogprobArgs) -> dict:
        # One-token sequences have no next-token prediction to make.
        scored = [i for i, s in enumerate(args.sequences) if len(s) > 1]
        datums = [Datum(tuple(args.sequences[i][:-1]), tuple(args.sequences[i][1:]),
                        (1.0,) * (len(args.sequences[i]) - 1)) for i in scored]
        logprobs: list[list[float | None]] = [[None] for _ in args.sequences]
        if datums:
            out = await shard_forward(ctx, run, request, datums, kind="forward",
                                      version=args.version, loss_fn="cross_entropy",
                                      loss_fn_config={}, sink=None)
            for i, lp in zip(scored, out.logprobs, strict=True):
                logprobs[i] = [None, *lp]
        return {"logprobs": logprobs, "version": args.version}
