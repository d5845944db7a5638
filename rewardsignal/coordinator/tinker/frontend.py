"""The Tinker front end's state: sessions, models (each one a Signal run;
sampling sessions are in ``sampling``), and how each Tinker call becomes an
operation of the registry.

Nothing here trains or samples: every call that does work is one operation
(``forward``, ``forward_backward``, ``optim_step``, ``save_state``,
``load_state``, ``sample``) queued on the model's run exactly as the ``/v1``
API queues it, so numerics, durability and scheduling are the same.

Names (sessions, model ids, sampler ids) are kept in the database, so paths
and ids a client holds still resolve after a coordinator restart.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.coordinator import ops
from rewardsignal.coordinator.coordinator import Coordinator
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.runs.create import RunRequest
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.tinker import wire
from rewardsignal.coordinator.tinker.futures import Futures, Sequencer, Turn
from rewardsignal.coordinator.tinker.names import (
    LORA_ALPHA,
    Model,
    max_length_of,
    parse_path,
    state_name,
    target_modules,
    tinker_path,
)
from rewardsignal.coordinator.tinker.sampling import Samplers
from rewardsignal.errors import NotFoundError, ValidationError
from rewardsignal.lora import LoraSpec
from rewardsignal.models import is_builtin, resolve_model_path

log = logging.getLogger("signal.tinker")


class TinkerFrontEnd:
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.futures = Futures()
        self.sessions: dict[str, str] = {}  # session id -> owner
        self.models: dict[str, Model] = {}
        self._seq: dict[str, Sequencer] = {}
        self.sampling = Samplers(coord, self.futures)

    async def start(self) -> None:
        db = self.coord.services.db
        for key, owner, _ in await db.names("tinker-session"):
            self.sessions[key] = owner
        for key, owner, v in await db.names("tinker-model"):
            self.models[key] = Model(key, owner, v["run_id"], v["flags"])
        await self.sampling.start()

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
        max_length = await asyncio.to_thread(max_length_of, base_model)
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
            sampler = await self.sampling.new(owner, session, seq_for_sampler, run.run_id,
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

    async def _checkpoint(self, owner: str, path: object) -> tuple[Run, str]:
        _, run, saved, _ = await self.resolve(owner, path)
        return run, saved

    async def create_sampling_session(self, owner: str, b: Body) -> dict:
        session_id = self.session(owner, b.str("session_id"))
        return await self.sampling.create(owner, session_id, b, self._checkpoint)
