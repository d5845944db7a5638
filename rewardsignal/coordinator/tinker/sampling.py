"""Tinker sampling sessions: each is a run at a pinned version (a saved
state, a snapshot taken by ``save_weights_for_sampler``, or, for a bare base
model, a rank-1 run whose adapter is still zero). ``asample`` is the ``sample``
operation at that version."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.coordinator import ops
from rewardsignal.coordinator.coordinator import Coordinator
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops.sample import MAX_NUM_SAMPLES
from rewardsignal.coordinator.runs.create import RunRequest
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.tinker import wire
from rewardsignal.coordinator.tinker.futures import Futures
from rewardsignal.coordinator.tinker.names import Sampler
from rewardsignal.errors import NotFoundError, ValidationError
from rewardsignal.lora import LoraSpec
from rewardsignal.models import model_info, resolve_model_path

# path -> (run, saved-state name) of a checkpoint the caller owns
Resolve = Callable[[str, object], Awaitable[tuple[Run, str]]]


class Samplers:
    def __init__(self, coord: Coordinator, futures: Futures) -> None:
        self.coord = coord
        self.futures = futures
        self.samplers: dict[str, Sampler] = {}
        self._seen: dict[str, dict[int, tuple[str, list[str]]]] = {}
        self._base_runs: dict[tuple[str, str], str] = {}

    async def start(self) -> None:
        db = self.coord.services.db
        for key, owner, v in await db.names("tinker-sampler"):
            self.samplers[key] = Sampler(key, owner, v["run_id"], v["version"], v["path"])
        for key, owner, v in await db.names("tinker-base-run"):
            self._base_runs[(owner, key.split("|", 1)[1])] = v["run_id"]

    async def new(self, owner: str, session_id: str, seq: int | None, run_id: str,
                           version: int, path: str | None) -> Sampler:
        sampler_id = f"{session_id}:sample:{seq if seq is not None else secrets.token_hex(4)}"
        if sampler_id in self.samplers:
            return self.samplers[sampler_id]
        await self.coord.services.db.put_name("tinker-sampler", sampler_id, owner, {
            "run_id": run_id, "version": version, "path": path})
        s = Sampler(sampler_id, owner, run_id, version, path)
        self.samplers[sampler_id] = s
        return s

    async def _base_run(self, owner: str, base_model: str) -> Run:
        """A rank-1 run whose adapter is still zero: sampling it is sampling the base."""
        run_id = self._base_runs.get((owner, base_model))
        if run_id is not None and run_id in self.coord.runs:
            return self.coord.runs[run_id]
        await asyncio.to_thread(resolve_model_path, base_model)
        spec = LoraSpec(r=1, alpha=1.0, dropout=0.0,
                        target_modules=model_info(base_model).default_target_modules, seed=0)
        run = await self.coord.create_run(owner, RunRequest(base_model, spec, AdamWConfig(),
                                                            1 << 20))
        await self.coord.services.db.put_name("tinker-base-run", f"{owner}|{base_model}", owner,
                                              {"run_id": run.run_id})
        self._base_runs[(owner, base_model)] = run.run_id
        return run

    async def create(self, owner: str, session_id: str, b: Body, resolve: Resolve) -> dict:
        """``create_sampling_session`` (the session already checked)."""
        seq = b.int("sampling_session_seq_id", lo=0)
        path = b.str("model_path", None, max_len=1024)
        base = b.str("base_model", None, max_len=512)
        if path is not None:
            run, saved = await resolve(owner, path)
            names = await asyncio.to_thread(self.coord.services.versions.store.names,
                                            run.run_id)
            sampler = await self.new(owner, session_id, seq, run.run_id, names[saved],
                                              path)
        elif base is not None:
            run = await self._base_run(owner, base)
            sampler = await self.new(owner, session_id, seq, run.run_id, 0, None)
        else:
            raise ValidationError("give model_path or base_model")
        return {"type": "create_sampling_session", "sampling_session_id": sampler.sampler_id}

    def get(self, owner: str, sampler_id: str) -> tuple[Sampler, Run]:
        s = self.samplers.get(sampler_id)
        run = self.coord.runs.get(s.run_id) if s is not None else None
        if s is None or s.owner != owner or run is None:
            raise NotFoundError(f"unknown sampling session {sampler_id!r}")
        return s, run

    def info(self, owner: str, sampler_id: str) -> dict:
        s, run = self.get(owner, sampler_id)
        return {"sampler_id": s.sampler_id, "base_model": run.spec.base_model,
                "model_path": s.model_path}

    async def sample(self, owner: str, b: Body) -> dict:
        s, run = self.get(owner, b.str("sampling_session_id"))
        seq = b.int("seq_id", lo=0)
        seen = self._seen.setdefault(s.sampler_id, {})
        if seq in seen:  # a re-sent call (429 back-off, or a retry): the same future
            request_id, ids = seen[seq]
            return {"request_id": request_id, "sample_sequence_ids": ids}
        n = b.int("num_samples", 1, lo=1, hi=MAX_NUM_SAMPLES)
        for unsupported in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
            if b.int(unsupported, 0, lo=0):
                raise ValidationError(f"{unsupported} is not supported by Signal (top-k "
                                      "logprobs are not computed)")
        if b.raw("target_prompt_logprobs", None) is not None:
            raise ValidationError("target_prompt_logprobs is not supported by Signal")
        tokens = _prompt_tokens(b.dict("prompt"))
        params = Body(b.dict("sampling_params", {}), "sampling_params")
        stop = params.raw("stop", None)
        top_k = params.int("top_k", -1, lo=-1)
        body: dict = {"prompt_tokens": [tokens], "num_samples": n,
                      "max_tokens": params.int("max_tokens", 64, lo=1, hi=4096),
                      "temperature": params.float("temperature", 1.0, lo=0, hi=100),
                      "top_p": params.float("top_p", 1.0, lo=0, lo_open=True, hi=1.0),
                      "top_k": max(top_k, 0), "version": s.version,
                      "include_prompt_logprobs": b.bool("prompt_logprobs", False)}
        seed = params.int("seed", None, lo=0, hi=2**63 - 1)
        if seed is not None:
            body["seed"] = seed
        if stop is not None:
            body["stop"] = [stop] if isinstance(stop, str) else stop
        op = ops.get("sample")
        parsed = Body(body)
        args = await op.parse(self.coord.services, run, owner, parsed)
        answer = await self.coord.submit(owner, run, op, args, None)
        req = self.coord.requests.get(answer["request_id"], owner)

        async def work() -> bytes:
            result = await asyncio.shield(req.future)
            return wire.sample_output(result, body["include_prompt_logprobs"])

        request_id = self.futures.run(owner, work(), answer["request_id"])
        ids = [f"{request_id}:{i}" for i in range(n)]
        seen[seq] = (request_id, ids)
        if len(seen) > 4096:
            del seen[min(seen)]
        return {"request_id": request_id, "sample_sequence_ids": ids}


def _prompt_tokens(prompt: dict) -> list[int]:
    chunks = prompt.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        raise ValidationError("prompt.chunks must be a non-empty list")
    tokens: list[int] = []
    for i, c in enumerate(chunks):
        if not isinstance(c, dict) or c.get("type", "encoded_text") != "encoded_text":
            raise ValidationError(f"prompt.chunks[{i}]: only encoded_text chunks are supported "
                                  "(text models only)")
        t = c.get("tokens")
        if not isinstance(t, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                              for x in t):
            raise ValidationError(f"prompt.chunks[{i}].tokens must be a list of token ids")
        tokens += t
    return tokens
