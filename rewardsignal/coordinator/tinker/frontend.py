"""The Tinker front end's state: sessions, models (each one a Signal run),
sampling sessions (a run at a pinned version), and how each Tinker call
becomes an operation of the registry.

Nothing here trains or samples: every call that does work is one operation
(``forward``, ``forward_backward``, ``optim_step``, ``save_state``,
``load_state``, ``sample``) queued on the model's run exactly as the ``/v1``
API queues it, so numerics, durability and scheduling are the same.

Names (sessions, model ids, sampler ids) are kept in the database, so paths
and ids a client holds still resolve after a coordinator restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.coordinator import ops
from rewardsignal.coordinator.coordinator import Coordinator
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops.sample import MAX_NUM_SAMPLES, context_length
from rewardsignal.coordinator.runs.create import RunRequest
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.tinker import wire
from rewardsignal.coordinator.tinker.futures import Futures, Sequencer, Turn
from rewardsignal.errors import NotFoundError, ValidationError
from rewardsignal.lora import LoraSpec
from rewardsignal.models import is_builtin, model_info, resolve_model_path

log = logging.getLogger("signal.tinker")

# Tinker's LoRA scale is alpha / rank with a fixed alpha.
LORA_ALPHA = 32.0
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SEGMENTS = {"weights": "w", "sampler_weights": "s"}  # tinker path segment -> name prefix


@dataclass
class Model:
    model_id: str
    owner: str
    run_id: str
    flags: dict  # train_attn / train_mlp / train_unembed


@dataclass
class Sampler:
    sampler_id: str
    owner: str
    run_id: str
    version: int
    model_path: str | None


def tinker_path(model_id: str, segment: str, name: str) -> str:
    return f"tinker://{model_id}/{segment}/{name}"


def parse_path(path: object) -> tuple[str, str, str]:
    """``tinker://<model_id>/<weights|sampler_weights>/<name>`` -> its parts."""
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise ValidationError(f"path must be a tinker:// path, got {path!r}")
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3 or parts[1] not in SEGMENTS or not parts[0] or not parts[2]:
        raise ValidationError(f"path {path!r} is not tinker://<model_id>/"
                              "{weights|sampler_weights}/<name>")
    return parts[0], parts[1], parts[2]


def state_name(segment: str, name: str) -> str:
    """The run's saved-state name for a Tinker checkpoint name."""
    full = f"{SEGMENTS[segment]}.{name}"
    if len(full) > 64 or not all(c.isalnum() or c in "_.-" for c in name):
        raise ValidationError(f"checkpoint name {name!r}: use at most 62 letters, digits, "
                              "'_', '.', '-'")
    return full


def target_modules(base_model: str, lora: dict) -> tuple[str, ...]:
    present = set(model_info(base_model).default_target_modules)
    wanted = [m for flag, mods in (("train_attn", ATTN), ("train_mlp", MLP))
              if lora.get(flag, True) for m in mods if m in present]
    if lora.get("train_unembed", True):
        wanted.append("lm_head")
    if not wanted:
        raise ValidationError("lora_config trains nothing: set train_attn, train_mlp or "
                              "train_unembed")
    return tuple(wanted)


class TinkerFrontEnd:
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.futures = Futures()
        self.sessions: dict[str, str] = {}  # session id -> owner
        self.models: dict[str, Model] = {}
        self.samplers: dict[str, Sampler] = {}
        self._seq: dict[str, Sequencer] = {}
        self._sampling: dict[str, dict[int, tuple[str, list[str]]]] = {}
        self._base_runs: dict[tuple[str, str], str] = {}

    async def start(self) -> None:
        db = self.coord.services.db
        for key, owner, _ in await db.names("tinker-session"):
            self.sessions[key] = owner
        for key, owner, v in await db.names("tinker-model"):
            self.models[key] = Model(key, owner, v["run_id"], v["flags"])
        for key, owner, v in await db.names("tinker-sampler"):
            self.samplers[key] = Sampler(key, owner, v["run_id"], v["version"], v["path"])
        for key, owner, v in await db.names("tinker-base-run"):
            self._base_runs[(owner, key.split("|", 1)[1])] = v["run_id"]

    # -- sessions -----------------------------------------------------------------------
    async def create_session(self, owner: str) -> str:
        session_id = "s-" + secrets.token_hex(8)
        await self.coord.services.db.put_name("tinker-session", session_id, owner, {})
        self.sessions[session_id] = owner
        return session_id

    def session(self, owner: str, session_id: object) -> str:
        if not isinstance(session_id, str) or self.sessions.get(session_id) != owner:
            raise NotFoundError(f"unknown session {session_id!r}")
        return session_id

    # -- models ---------------------------------------------------------------------------
    def model(self, owner: str, model_id: object) -> tuple[Model, Run]:
        m = self.models.get(model_id) if isinstance(model_id, str) else None
        run = self.coord.runs.get(m.run_id) if m is not None else None
        if m is None or m.owner != owner or run is None:
            raise NotFoundError(f"unknown model {model_id!r}")
        return m, run

    def _sequencer(self, model_id: str, first: int) -> Sequencer:
        if model_id not in self._seq:
            self._seq[model_id] = Sequencer(self.futures, first)
        return self._seq[model_id]

    async def _new_model(self, owner: str, session_id: str, model_seq_id: int, base_model: str,
                         lora: dict) -> Model:
        model_id = f"{session_id}:train:{model_seq_id}"
        if model_id in self.models:
            raise ValidationError(f"model {model_id} exists already")
        targets = target_modules(base_model, lora)
        rank = lora.get("rank", 32)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 1024:
            raise ValidationError(f"lora_config.rank must be an integer in [1, 1024], got {rank!r}")
        seed = lora.get("seed") or 0
        spec = LoraSpec(r=rank, alpha=LORA_ALPHA, dropout=0.0, target_modules=targets, seed=seed)
        max_length = await asyncio.to_thread(_context, base_model)
        run = await self.coord.create_run(owner, RunRequest(base_model, spec, AdamWConfig(),
                                                            max_length))
        flags = {k: bool(lora.get(k, True)) for k in ("train_attn", "train_mlp", "train_unembed")}
        await self.coord.services.db.put_name("tinker-model", model_id, owner,
                                              {"run_id": run.run_id, "flags": flags})
        m = Model(model_id, owner, run.run_id, flags)
        self.models[model_id] = m
        return m

    async def create_model(self, owner: str, b: Body) -> str:
        session_id = self.session(owner, b.str("session_id"))
        seq = b.int("model_seq_id", lo=0)
        base = b.str("base_model", max_len=512)
        lora = b.dict("lora_config", {})
        await asyncio.to_thread(resolve_model_path, base)  # unknown model: a 404 now

        async def work() -> dict:
            m = await self._new_model(owner, session_id, seq, base, lora)
            self._sequencer(m.model_id, 1)
            return {"model_id": m.model_id, "type": "create_model"}

        return self.futures.run(owner, work())

    def info(self, owner: str, model_id: object) -> dict:
        m, run = self.model(owner, model_id)
        base = run.spec.base_model
        tokenizer = str(resolve_model_path(base)) if is_builtin(base) else base
        return {"type": "get_info", "model_id": m.model_id, "is_lora": True,
                "signal_run_id": run.run_id,
                "lora_rank": run.spec.lora.r, "model_name": base,
                "model_data": {"model_name": base, "tokenizer_id": tokenizer, "arch": "lora"}}

    # -- operations on a model -----------------------------------------------------------
    async def _queue(self, owner: str, run: Run, op_name: str, body: dict, turn: Turn,
                     ) -> dict:
        """Parse ``body`` as ``op_name`` would from ``/v1``, queue it in turn,
        and wait for its result."""
        op = ops.get(op_name)
        b = Body(body)
        args = await op.parse(self.coord.services, run, owner, b)
        b.done()
        async with turn:
            answer = await self.coord.submit(owner, run, op, args, None)
        req = self.coord.requests.get(answer["request_id"], owner)
        return await asyncio.shield(req.future)

    def _ordered(self, owner: str, model_id: object, seq_id: object,
                 work: Callable[[Model, Run, Turn], Awaitable[Any]]) -> str:
        m, run = self.model(owner, model_id)
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0:
            raise ValidationError(f"seq_id must be a non-negative integer, got {seq_id!r}")
        return self._sequencer(m.model_id, 1).offer(owner, seq_id,
                                                    lambda turn: work(m, run, turn))

    def forward_backward(self, owner: str, call: wire.ForwardBackwardCall) -> str:
        async def work(m: Model, run: Run, turn: Turn) -> bytes:
            body = {"batch": call.batch, "loss_fn": call.loss_fn,
                    "loss_fn_config": call.loss_fn_config}
            if not call.forward_only:
                body["reduction"] = "sum"  # Tinker's losses are sums over tokens
            result = await self._queue(owner, run, "forward" if call.forward_only
                                       else "forward_backward", body, turn)
            return wire.forward_output(result, call.loss_fn)

        return self._ordered(owner, call.model_id, call.seq_id, work)

    def optim_step(self, owner: str, b: Body) -> str:
        model_id, seq_id = b.str("model_id"), b.int("seq_id", lo=0)
        p = Body(b.dict("adam_params"), "adam_params")
        clip = p.float("grad_clip_norm", 0.0, lo=0)
        body = {"learning_rate": p.float("learning_rate", lo=0, hi=10),
                "beta1": p.float("beta1", 0.9, lo=0, hi=0.999999),
                "beta2": p.float("beta2", 0.95, lo=0, hi=0.99999999),
                "eps": p.float("eps", 1e-12, lo=0, lo_open=True, hi=1.0),
                "weight_decay": p.float("weight_decay", 0.0, lo=0, hi=10),
                **({"grad_clip_norm": clip} if clip > 0 else {})}
        p.done()

        async def work(m: Model, run: Run, turn: Turn) -> dict:
            result = await self._queue(owner, run, "optim_step", body, turn)
            metrics = {} if result.get("loss") is None else {"loss:mean": result["loss"]}
            return {"type": "optim_step", "metrics": metrics}

        return self._ordered(owner, model_id, seq_id, work)

    def save(self, owner: str, b: Body, *, for_sampler: bool) -> str:
        model_id, seq_id = b.str("model_id"), b.int("seq_id", lo=0)
        name = b.str("path", None, max_len=62)
        segment = "sampler_weights" if for_sampler else "weights"
        if name is None and not for_sampler:
            raise ValidationError("save_weights needs a name ('path')")
        saved = state_name(segment, name) if name is not None else None
        seq_for_sampler = b.int("sampling_session_seq_id", None, lo=0)

        async def work(m: Model, run: Run, turn: Turn) -> dict:
            body = {"mode": "adapter", **({"name": saved} if saved else {})}
            meta = await self._queue(owner, run, "save_state", body, turn)
            if name is not None:
                path = tinker_path(m.model_id, segment, name)
                return {"type": "save_weights_for_sampler" if for_sampler else "save_weights",
                        "path": path}
            session = m.model_id.split(":train:")[0]
            sampler = await self._new_sampler(owner, session, seq_for_sampler, run.run_id,
                                              meta["version"], None)
            return {"type": "save_weights_for_sampler", "path": None,
                    "sampling_session_id": sampler.sampler_id}

        return self._ordered(owner, model_id, seq_id, work)

    async def resolve(self, owner: str, path: object) -> tuple[Model, Run, str, str]:
        """A tinker path -> (model, run, saved-state name, segment)."""
        model_id, segment, name = parse_path(path)
        m, run = self.model(owner, model_id)
        saved = state_name(segment, name)
        names = await asyncio.to_thread(self.coord.services.versions.store.names, run.run_id)
        if saved not in names:
            raise NotFoundError(f"no checkpoint {path}")
        return m, run, saved, segment

    async def load(self, owner: str, b: Body) -> str:
        path = b.str("path", max_len=1024)
        optimizer = b.bool("optimizer", False)
        source, source_run, saved, _ = await self.resolve(owner, path)
        body = {"from_run": source_run.run_id, "name": saved, "optimizer": optimizer}

        async def work(m: Model, run: Run, turn: Turn) -> dict:
            await self._queue(owner, run, "load_state", body, turn)
            return {"type": "load_weights", "path": path, "model_id": m.model_id}

        model_id = b.str("model_id", None)
        if model_id is not None:
            return self._ordered(owner, model_id, b.int("seq_id", lo=0), work)
        # A new model from the checkpoint (create_training_client_from_state):
        # the load is its seq 0, and its later calls wait for it.
        session_id = self.session(owner, b.str("session_id"))
        seq = b.int("model_seq_id", lo=0)
        lora = {"rank": source_run.spec.lora.r, "seed": source_run.spec.lora.seed,
                **source.flags}
        created = asyncio.get_running_loop().create_future()

        async def create_then_load(turn: Turn) -> dict:
            m = await self._new_model(owner, session_id, seq, source_run.spec.base_model, lora)
            created.set_result(m)
            return await work(m, self.coord.runs[m.run_id], turn)

        model_id = f"{session_id}:train:{seq}"
        return self._sequencer(model_id, 0).offer(owner, 0, create_then_load)

    async def checkpoint_names(self, run_id: str) -> dict[str, tuple[int, float]]:
        """A run's saved states: name -> (version, time saved)."""
        def read() -> dict[str, tuple[int, float]]:
            root = self.coord.services.artifacts.root / run_id
            out = {}
            for name, version in self.coord.services.versions.store.names(run_id).items():
                meta = root / name / "artifact.json"
                out[name] = (version, meta.stat().st_mtime if meta.exists() else 0.0)
            return out

        return await asyncio.to_thread(read)

    # -- sampling -------------------------------------------------------------------------
    async def _new_sampler(self, owner: str, session_id: str, seq: int | None, run_id: str,
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

    async def create_sampling_session(self, owner: str, b: Body) -> dict:
        session_id = self.session(owner, b.str("session_id"))
        seq = b.int("sampling_session_seq_id", lo=0)
        path = b.str("model_path", None, max_len=1024)
        base = b.str("base_model", None, max_len=512)
        if path is not None:
            _, run, saved, _ = await self.resolve(owner, path)
            names = await asyncio.to_thread(self.coord.services.versions.store.names,
                                            run.run_id)
            sampler = await self._new_sampler(owner, session_id, seq, run.run_id, names[saved],
                                              path)
        elif base is not None:
            run = await self._base_run(owner, base)
            sampler = await self._new_sampler(owner, session_id, seq, run.run_id, 0, None)
        else:
            raise ValidationError("give model_path or base_model")
        return {"type": "create_sampling_session", "sampling_session_id": sampler.sampler_id}

    def sampler(self, owner: str, sampler_id: str) -> tuple[Sampler, Run]:
        s = self.samplers.get(sampler_id)
        run = self.coord.runs.get(s.run_id) if s is not None else None
        if s is None or s.owner != owner or run is None:
            raise NotFoundError(f"unknown sampling session {sampler_id!r}")
        return s, run

    def sampler_info(self, owner: str, sampler_id: str) -> dict:
        s, run = self.sampler(owner, sampler_id)
        return {"sampler_id": s.sampler_id, "base_model": run.spec.base_model,
                "model_path": s.model_path}

    async def sample(self, owner: str, b: Body) -> dict:
        s, run = self.sampler(owner, b.str("sampling_session_id"))
        seq = b.int("seq_id", lo=0)
        seen = self._sampling.setdefault(s.sampler_id, {})
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

        request_id = self.futures.run(owner, work())
        ids = [f"{request_id}:{i}" for i in range(n)]
        seen[seq] = (request_id, ids)
        if len(seen) > 4096:
            del seen[min(seen)]
        return {"request_id": request_id, "sample_sequence_ids": ids}


def _context(base_model: str) -> int:
    """The longest sequence a model's runs take: its configured context (read
    from its ``config.json``), at most 32768 tokens (the placement memory
    estimate assumes sequences this long can come); 2048 when not stated."""
    if is_builtin(base_model):
        return context_length(base_model)
    config = resolve_model_path(base_model) / "config.json"
    try:
        n = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        n = None
    return min(int(n), 32768) if isinstance(n, int) and n > 1 else 2048


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
