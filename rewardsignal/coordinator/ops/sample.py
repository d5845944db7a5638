"""``sample``: generation from the run's current adapter on one worker."""

from __future__ import annotations

import asyncio

from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.ops.tasks import gather_tasks
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services
from rewardsignal.errors import ValidationError
from rewardsignal.models import BUILTIN_MODELS, is_builtin

MAX_PROMPTS = 256
_PARAMS = ("prompt_tokens", "max_tokens", "temperature", "top_p", "seed")


def _prompt_tokens(body: Body, tok) -> list[list[int]]:
    prompts = body.list("prompts", None, max_len=MAX_PROMPTS)
    prompt_tokens = body.list("prompt_tokens", None, max_len=MAX_PROMPTS)
    if (prompts is None) == (prompt_tokens is None):
        raise ValidationError("give exactly one of 'prompts' (strings) or 'prompt_tokens'")
    if prompts is not None:
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValidationError("field 'prompts' must be a non-empty list of strings")
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return [bos + tok.encode(p, add_special_tokens=False) for p in prompts]
    vocab = len(tok)
    if not prompt_tokens or not all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                              and 0 <= t < vocab for t in p)
            for p in prompt_tokens):
        raise ValidationError(f"field 'prompt_tokens' must be a non-empty list of non-empty "
                              f"lists of token ids in [0, {vocab})")
    return prompt_tokens


def _context_length(model_id: str) -> int:
    # Hub models: no limit known here; the worker's model enforces its own.
    return BUILTIN_MODELS[model_id].max_position_embeddings if is_builtin(model_id) else 1 << 20


def _read(body: Body, tok, model_id: str) -> dict:
    """Blocking (tokenises, reads the model's config): runs in a thread."""
    prompt_tokens = _prompt_tokens(body, tok)
    limit = _context_length(model_id)
    max_tokens = body.int("max_tokens", 64, lo=1, hi=4096)
    longest = max(map(len, prompt_tokens))
    if longest + max_tokens > limit:
        raise ValidationError(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the "
                              f"model's context of {limit} tokens")
    return {"prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
            "temperature": body.float("temperature", 1.0, lo=0, hi=100),
            "top_p": body.float("top_p", 1.0, lo=0, lo_open=True, hi=1.0),
            "seed": body.int("seed", None, lo=0, hi=2**63 - 1)}


class Sample(Operation):
    name = "sample"
    ordered = False  # reads the current version: never waits behind a federated job

    async def parse(self, ctx: Services, run: Run, owner: str, body: Body) -> dict:
        model_id = run.spec.base_model
        tok = await asyncio.to_thread(ctx.tokenizers.get, model_id)
        args = await asyncio.to_thread(_read, body, tok, model_id)
        # The latest version when the request is accepted: what it samples, even
        # if steps queued before it land first.
        return {**args, "version": run.version}

    def load(self, ctx: Services, run: Run, data: dict) -> dict:
        return {**data, "version": data.get("version", run.version)}

    async def execute(self, ctx: Services, run: Run, request: Request, args: dict) -> dict:
        prompts: list[list[int]] = args["prompt_tokens"]
        task = ctx.scheduler.add_task(
            kind="sample", run_id=run.run_id, base_model=run.spec.base_model,
            version=args["version"], tokens=sum(map(len, prompts)),
            payload={k: args[k] for k in _PARAMS}, group=run.spec.owner)
        async for _, res in gather_tasks(ctx.scheduler, [task], request, run.spec.base_model,
                                         ctx.config.no_worker_grace_s):
            outs = res["outputs"]
            return {"outputs": [o["text"] for o in outs], "tokens": [o["tokens"] for o in outs],
                    "logprobs": [o["logprobs"] for o in outs], "version": args["version"]}
        raise AssertionError("unreachable: the task resolved or raised")
