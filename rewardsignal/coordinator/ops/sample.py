"""``sample``: generation from one version of the run, spread over the fleet.

A request (prompts x ``num_samples``) is cut into tasks of whole prompt groups,
at most ``SEQUENCES_PER_TASK`` sequences each. The cut depends on the request
only, not on the fleet, and every sequence is seeded by (seed, prompt index,
sample index): the same request gives the same tokens however many workers
share it. Results are put back in request order.

``sample`` is not ordered behind the run's queue: it samples the version it
names, by default the latest when the request is accepted, so it never waits
behind a federated job.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.ops.tasks import counted_results
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services
from rewardsignal.coordinator.trust.sample_check import check_sample
from rewardsignal.data.examples import encode_text
from rewardsignal.errors import TaskFailedError, ValidationError
from rewardsignal.models import BUILTIN_MODELS, is_builtin

MAX_PROMPTS = 256
MAX_NUM_SAMPLES = 128
MAX_STOP = 16
# Generated tokens one request may ask for (prompts x num_samples x max_tokens).
MAX_REQUEST_TOKENS = 1 << 20
SEQUENCES_PER_TASK = 64
# Rounds of sampling again the groups whose result a check did not uphold.
_MAX_ROUNDS = 4


@dataclass(frozen=True)
class SampleArgs:
    prompt_tokens: list[list[int]]
    num_samples: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop_ids: list[int]
    stop_strings: list[str]
    seed: int | None
    prompt_logprobs: bool
    version: int

    def task_payload(self, start: int, end: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens[start:end], "prompt_offset": start,
                "num_samples": self.num_samples, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "stop_ids": self.stop_ids, "stop_strings": self.stop_strings, "seed": self.seed,
                "prompt_logprobs": self.prompt_logprobs}


def context_length(model_id: str) -> int:
    # Hub models: no limit known here; the worker's model enforces its own.
    return BUILTIN_MODELS[model_id].max_position_embeddings if is_builtin(model_id) else 1 << 20


def read_prompt_tokens(body: Body, tok) -> list[list[int]]:
    """``prompts`` (strings, tokenised as ``tokenizer(prompt)`` does: with the
    BOS the tokenizer adds itself, none where it adds none) or ``prompt_tokens``
    (ids), each non-empty."""
    prompts = body.list("prompts", None, max_len=MAX_PROMPTS)
    prompt_tokens = body.list("prompt_tokens", None, max_len=MAX_PROMPTS)
    if (prompts is None) == (prompt_tokens is None):
        raise ValidationError("give exactly one of 'prompts' (strings) or 'prompt_tokens'")
    if prompts is not None:
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValidationError("field 'prompts' must be a non-empty list of non-empty strings")
        return [encode_text(tok, p) for p in prompts]
    return check_token_lists(prompt_tokens, len(tok), "prompt_tokens")


def check_token_lists(seqs: object, vocab: int, field: str) -> list[list[int]]:
    if not isinstance(seqs, list) or not seqs or not all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                              and 0 <= t < vocab for t in p) for p in seqs):
        raise ValidationError(f"field {field!r} must be a non-empty list of non-empty lists "
                              f"of token ids in [0, {vocab})")
    return seqs


def _read_stop(body: Body, vocab: int) -> tuple[list[int], list[str]]:
    stop = body.list("stop", [], max_len=MAX_STOP)
    ids = [s for s in stop if isinstance(s, int) and not isinstance(s, bool)]
    strings = [s for s in stop if isinstance(s, str)]
    if len(ids) + len(strings) != len(stop) or not all(0 <= i < vocab for i in ids) or not all(
            0 < len(s) <= 64 for s in strings):
        raise ValidationError(f"field 'stop' must list at most {MAX_STOP} token ids in "
                              f"[0, {vocab}) and/or strings of 1-64 characters")
    return ids, strings


def _read(body: Body, tok, run: Run) -> SampleArgs:
    """Blocking (tokenises): runs in a thread."""
    prompt_tokens = read_prompt_tokens(body, tok)
    num_samples = body.int("num_samples", 1, lo=1, hi=MAX_NUM_SAMPLES)
    max_tokens = body.int("max_tokens", 64, lo=1, hi=4096)
    limit = context_length(run.spec.base_model)
    longest = max(map(len, prompt_tokens))
    if longest + max_tokens > limit:
        raise ValidationError(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the "
                              f"model's context of {limit} tokens")
    total = len(prompt_tokens) * num_samples * max_tokens
    if total > MAX_REQUEST_TOKENS:
        raise ValidationError(f"this request could generate {total:,} tokens (prompts x "
                              f"num_samples x max_tokens); at most {MAX_REQUEST_TOKENS:,} per "
                              "request: split it")
    stop_ids, stop_strings = _read_stop(body, len(tok))
    version = body.int("version", run.version, lo=0, hi=run.version)
    return SampleArgs(
        prompt_tokens, num_samples, max_tokens,
        temperature=body.float("temperature", 1.0, lo=0, hi=100),
        top_p=body.float("top_p", 1.0, lo=0, lo_open=True, hi=1.0),
        top_k=body.int("top_k", 0, lo=0, hi=1 << 20), stop_ids=stop_ids,
        stop_strings=stop_strings, seed=body.int("seed", None, lo=0, hi=2**63 - 1),
        prompt_logprobs=body.bool("include_prompt_logprobs", False), version=version)


def _groups(args: SampleArgs) -> list[tuple[int, int]]:
    per_task = max(1, SEQUENCES_PER_TASK // args.num_samples)
    n = len(args.prompt_tokens)
    return [(i, min(i + per_task, n)) for i in range(0, n, per_task)]


class Sample(Operation):
    name = "sample"
    ordered = False  # reads the version it names: never waits behind a federated job
    starts_unstored = True  # changes nothing

    async def parse(self, ctx: Services, run: Run, owner: str, body: Body) -> SampleArgs:
        tok = await asyncio.to_thread(ctx.tokenizers.get, run.spec.base_model)
        args = await asyncio.to_thread(_read, body, tok, run)
        # Pruned or never written: a 404 now, nothing queued.
        await ctx.versions.adapter_sha256(run.run_id, args.version)
        return args

    def dump(self, args: SampleArgs) -> dict:
        return {**args.__dict__}

    def load(self, ctx: Services, run: Run, data: dict) -> SampleArgs:
        defaults = {"num_samples": 1, "top_k": 0, "stop_ids": [], "stop_strings": [],
                    "prompt_logprobs": False, "version": run.version}
        return SampleArgs(**{**defaults, **data})

    async def execute(self, ctx: Services, run: Run, request: Request,
                      args: SampleArgs) -> dict:
        groups = _groups(args)
        results: dict[int, dict] = {}
        todo = list(range(len(groups)))
        for _ in range(_MAX_ROUNDS):
            await self._round(ctx, run, request, args, groups, todo, results)
            todo = [i for i in range(len(groups)) if i not in results]
            if not todo:
                break
        else:
            raise TaskFailedError(f"{len(todo)} sample group(s) of request "
                                  f"{request.request_id} found no result that other workers "
                                  f"agreed with in {_MAX_ROUNDS} rounds")
        per_prompt: list[list[dict]] = [[] for _ in args.prompt_tokens]
        prompt_lps: list = [None] * len(args.prompt_tokens)
        for i, (a, b) in enumerate(groups):
            res = results[i]
            outs = res["outputs"]
            for p in range(a, b):
                per_prompt[p] = outs[(p - a) * args.num_samples:(p - a + 1) * args.num_samples]
                if "prompt_logprobs" in res:
                    prompt_lps[p] = res["prompt_logprobs"][p - a]
        return _result(per_prompt, prompt_lps if args.prompt_logprobs else None, args)

    async def _round(self, ctx: Services, run: Run, request: Request, args: SampleArgs,
                     groups: list[tuple[int, int]], todo: list[int],
                     results: dict[int, dict]) -> None:
        """Sample the groups in ``todo``; a result sampled for a check
        (``trust.sample_check``) counts once another worker's forward pass agrees."""
        tasks = [ctx.scheduler.add_task(
            kind="sample", run_id=run.run_id, base_model=run.spec.base_model,
            version=args.version, payload=args.task_payload(*groups[i]), group=run.spec.owner,
            tokens=(sum(map(len, args.prompt_tokens[groups[i][0]:groups[i][1]]))
                    + args.max_tokens * (groups[i][1] - groups[i][0])) * args.num_samples)
            for i in todo]
        got = await counted_results(ctx, run, request, tasks,
                                    lambda t, outcome: check_sample(ctx.verifier, run, t, outcome))
        for j, outcome in got.items():
            if outcome is not None:
                results[todo[j]] = outcome.result


def _result(per_prompt: list[list[dict]], prompt_lps: list | None, args: SampleArgs) -> dict:
    # ``outputs`` / ``tokens`` / ``logprobs``: each prompt's first sample, as the
    # API answered before ``num_samples`` (existing callers keep working).
    out = {"sequences": per_prompt, "prompt_tokens": args.prompt_tokens,
           "outputs": [s[0]["text"] for s in per_prompt],
           "tokens": [s[0]["tokens"] for s in per_prompt],
           "logprobs": [s[0]["logprobs"] for s in per_prompt], "version": args.version}
    if prompt_lps is not None:
        out["prompt_logprobs"] = prompt_lps
    return out

