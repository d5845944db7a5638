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

from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.coordinator import ops
from rewardsignal.coordinator.coordinator import Coordinator
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.runs.create import RunRequest
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.tinker import wire
from rewardsignal.coordinator.tinker.futures import Futures, Sequencer, Turn, error_result
from rewardsignal.coordinator.tinker.names import (
    LORA_ALPHA,
    SEGMENTS,
    Model,
    max_length_of,
    parse_path,
    state_name,
    target_modules,
    tinker_path,
)
from rewardsignal.coordinator.tinker.sampling import Samplers
from rewardsignal.errors import NotFoundError, SignalError, ValidationError
from rewardsignal.lora import LoraSpec
from rewardsignal.models import is_builtin, resolve_model_path

log = logging.getLogger("signal.tinker")
# Saved-state names of unnamed sampler snapshots: this plus the sampling
# session's number (save_weights_and_get_sampling_client).
SNAPSHOT = "snapshot-"


def _key_prefix(model_id: str) -> str:
    """Idempotency keys of a model's calls: this plus the call's seq_id."""
    return f"tinker/{model_id}/"


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
            self._seq.setdefault(m.model_id, Sequencer(self.futures, 1))
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
    async def _sequencer(self, owner: str, model_id: str) -> Sequencer:
        seq = self._seq.get(model_id)
        if seq is None:
            # After a restart: the calls queued before it are in the database.
            queued = await self.coord.services.db.key_suffixes(owner, _key_prefix(model_id))
            first = max((int(x) for x in queued if x.isdigit()), default=0) + 1
            seq = self._seq.setdefault(model_id, Sequencer(self.futures, first))
        return seq

    async def _ordered(self, owner: str, m: Model, seq_id: object, op_name: str,
                       body: dict, sequencer: Sequencer | None = None,
                       before: Callable[[], Awaitable[Run]] | None = None) -> str:
        """Queue ``op_name`` with ``body`` on the model's run in ``seq_id`` order.
        The Tinker request id is the Signal request's, and the call's
        idempotency key is (model, seq_id): a re-sent call, before or after a
        restart, gets the first one's request."""
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0:
            raise ValidationError(f"seq_id must be a non-negative integer, got {seq_id!r}")
        sequencer = sequencer or await self._sequencer(owner, m.model_id)
        key = f"{_key_prefix(m.model_id)}{seq_id}"
        if seq_id < sequencer.next_seq and not sequencer.seen(seq_id):
            found = await self.coord.services.db.find_key(owner, key)
            if found is not None:
                return found["ref"]
        request_id = "req-" + secrets.token_hex(8)

        async def start(turn: Turn) -> dict | bytes:
            run = await before() if before is not None else self.coord.runs[m.run_id]
            op = ops.get(op_name)
            b = Body(body)
            args = await op.parse(self.coord.services, run, owner, b)
            b.done()

            async def accept() -> dict:
                async with turn:
                    return await self.coord.submit(owner, run, op, args, None, key,
                                                   request_id=request_id)

            answer, _ = await self.coord.once(owner, key, accept, kind="request")
            req = self.coord.requests.get(answer["request_id"], owner)
            return await self.to_tinker(req.kind, await asyncio.shield(req.future), run.run_id)

        return sequencer.offer(owner, seq_id, start, request_id)

    async def forward_backward(self, owner: str, call: wire.ForwardBackwardCall) -> str:
        m, _ = self.model(owner, call.model_id)
        body = {"batch": call.batch, "loss_fn": call.loss_fn,
                "loss_fn_config": call.loss_fn_config}
        if not call.forward_only:
            body["reduction"] = "sum"  # Tinker's losses are sums over tokens
        return await self._ordered(owner, m, call.seq_id, "forward" if call.forward_only
                                   else "forward_backward", body)

    async def optim_step(self, owner: str, b: Body) -> str:
        m, _ = self.model(owner, b.str("model_id"))
        p = Body(b.dict("adam_params"), "adam_params")
        clip = p.float("grad_clip_norm", 0.0, lo=0)
        body = {"learning_rate": p.float("learning_rate", lo=0, hi=10),
                "beta1": p.float("beta1", 0.9, lo=0, hi=0.999999),
                "beta2": p.float("beta2", 0.95, lo=0, hi=0.99999999),
                "eps": p.float("eps", 1e-12, lo=0, lo_open=True, hi=1.0),
                "weight_decay": p.float("weight_decay", 0.0, lo=0, hi=10),
                **({"grad_clip_norm": clip} if clip > 0 else {})}
        p.done()
        return await self._ordered(owner, m, b.int("seq_id", lo=0), "optim_step", body)

    async def save(self, owner: str, b: Body, *, for_sampler: bool) -> str:
        m, _ = self.model(owner, b.str("model_id"))
        name = b.str("path", None, max_len=62)
        segment = "sampler_weights" if for_sampler else "weights"
        if name is not None:
            saved = state_name(segment, name)
        elif for_sampler:
            # A snapshot for a sampling session: the name carries the session's
            # number, so its id can be made again from the saved state alone.
            saved = f"{SNAPSHOT}{b.int('sampling_session_seq_id', lo=0)}"
        else:
            raise ValidationError("save_weights needs a name ('path')")
        return await self._ordered(owner, m, b.int("seq_id", lo=0), "save_state",
                                   {"mode": "adapter", "name": saved})

    async def to_tinker(self, kind: str, result: dict, run_id: str) -> dict | bytes:
        """A Signal operation's result as the Tinker call that queued it answers."""
        if kind in ("forward", "forward_backward"):
            return wire.forward_output(result)
        if kind == "optim_step":
            return {"type": "optim_step",
                    "metrics": {} if result.get("loss") is None else {"loss:mean": result["loss"]}}
        if kind == "sample":
            return wire.sample_output(result, "prompt_logprobs" in result)
        model_id = next((m.model_id for m in self.models.values() if m.run_id == run_id), None)
        if kind == "load_state":
            return {"type": "load_weights", "model_id": model_id}
        if kind == "save_state" and model_id is not None:
            name = result["name"]
            if name.startswith(SNAPSHOT):
                owner = self.models[model_id].owner
                sampler = await self.sampling.new(
                    owner, model_id.split(":train:")[0], int(name[len(SNAPSHOT):]), run_id,
                    result["version"], None)
                return {"type": "save_weights_for_sampler", "sampling_session_id":
                        sampler.sampler_id}
            prefix, _, short = name.partition(".")
            segment = next(k for k, v in SEGMENTS.items() if v == prefix)
            return {"type": "save_weights" if prefix == "w" else "save_weights_for_sampler",
                    "path": tinker_path(model_id, segment, short)}
        raise NotFoundError(f"request of kind {kind} was not made through the Tinker API")

    def queue_state(self, owner: str, request_id: str) -> dict:
        """What a still-running call waits on, as the SDK reports it."""
        try:
            waiting = self.coord.requests.get(request_id, owner).waiting_for_workers
        except NotFoundError:  # not queued yet: waiting for a lower seq_id
            waiting = False
        if waiting:
            return {"queue_state": "paused_capacity", "queue_state_reason":
                    "no live worker can serve this model yet; start one with "
                    "`signal-worker --coordinator URL`"}
        return {"queue_state": "active"}

    async def recovered(self, owner: str, request_id: str, timeout_s: float
                        ) -> dict | bytes | None:
        """A request this front end no longer holds a future for (the coordinator
        restarted since): its Signal request, live or finished, converted; None
        while it still runs."""
        try:
            req = self.coord.requests.get(request_id, owner)
        except NotFoundError:
            old = await self.coord.services.db.finished_request(request_id)
            if old is None or old["owner"] != owner:
                raise
            if old["status"] != "done":
                err = old["result"].get("error", {})
                return error_result(SignalError(err.get("message", "failed"),
                                                code=err.get("code")))
            return await self.to_tinker(old["kind"], old["result"], old["run_id"])
        done, _ = await asyncio.wait({req.future}, timeout=timeout_s)
        if not done:
            return None
        if req.future.cancelled() or req.future.exception() is not None:
            return error_result(req.future.exception() or SignalError("cancelled"))
        return await self.to_tinker(req.kind, req.future.result(), req.run_id)

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
        model_id = b.str("model_id", None)
        if model_id is not None:
            m, _ = self.model(owner, model_id)
            return await self._ordered(owner, m, b.int("seq_id", lo=0), "load_state", body)
        # A new model from the checkpoint (create_training_client_from_state):
        # the load is its seq 0, and its later calls wait for it.
        session_id = self.session(owner, b.str("session_id"))
        seq = b.int("model_seq_id", lo=0)
        model_id = f"{session_id}:train:{seq}"
        if model_id in self.models:  # a re-send: the model exists, its seq 0 is known
            return await self._ordered(owner, self.models[model_id], 0, "load_state", body)
        lora = {"rank": source_run.spec.lora.r, "seed": source_run.spec.lora.seed,
                **source.flags}
        sequencer = self._seq.setdefault(model_id, Sequencer(self.futures, 0))
        placeholder = Model(model_id, owner, "", source.flags)

        async def create() -> Run:
            m = await self._new_model(owner, session_id, seq, source_run.spec.base_model, lora)
            placeholder.run_id = m.run_id
            return self.coord.runs[m.run_id]

        return await self._ordered(owner, placeholder, 0, "load_state", body, sequencer,
                                   before=create)

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
