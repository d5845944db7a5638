"""A run's versions: checkpoints, each version's adapter sha256 kept in memory
from the moment it is committed, and the newest adapter files (``weights``).

A version's checkpoint is written either before the version becomes visible
(version 0, federated rounds: nothing else could rebuild them), or, for an
``optim_step`` whose inputs are already durable (accepted gradients in
``store.pending``, the request and its arguments in SQLite), in the background
after it: recovery rebuilds such a version by replaying the step
(``coordinator.recovery``). Background writes of a run land in version order; the
gradients a checkpoint contains are dropped only once it has landed.

Background writes of a run start at most once per ``interval_s`` (and at most
``WRITE_SHARE`` of the time: after a write that took 0.2 s the next waits 2 s),
and not while the last one has not landed: a version committed sooner waits,
and a newer version replaces it (its step is replayed instead, from inputs kept
until a checkpoint after it lands). The newest version waiting is written when
the interval is up, at ``flush`` and at a clean stop, or once ``MAX_DEFERRED``
versions have waited.
A fast run (a step in tens of milliseconds) then pays for a checkpoint a
second instead of one a step: on a small machine its writes and hashing took
CPU from the worker computing beside it.

The sha256 names a version on the wire (task messages, the weights ETag); it is
cached here so that leases and weight downloads never read a manifest on the
event loop. All disk work runs in a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.checkpoints import CheckpointStore
from rewardsignal.checkpoints.store import ADAPTER_FILE
from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.runs.state import Run, RunSpec
from rewardsignal.coordinator.runs.weights import RecentWeights
from rewardsignal.errors import SignalError
from rewardsignal.lora import adapter_config_json
from rewardsignal.memory import ModelShape, shape_of
from rewardsignal.protocol import tensors_to_bytes, xor_delta

log = logging.getLogger("signal.coordinator")

# (run, version) -> adapter sha256 entries kept; far more than any run's live
# versions (older ones are re-read from their manifest, off the loop, if asked).
_SHA_CACHE = 4096
# Versions of a run whose checkpoint may wait at once: a restart replays at most
# this many steps (their finished requests must still be in the database).
MAX_DEFERRED = 32
# The share of the time a run's background checkpoints may take: a big adapter's
# (tens of MB of weights and optimizer state, written, hashed and synced) are
# spaced out further than ``interval_s`` so they do not take the CPU a step needs.
WRITE_SHARE = 0.1
# ... but one write stalled by the disk spaces the next out by this much at most.
MAX_WRITE_GAP_S = 60.0


@dataclasses.dataclass
class _Deferred:
    """The newest version of a run whose background write waits its turn."""

    staged: Run
    adapter: bytes
    metrics: dict
    request_id: str | None
    landed: Callable[[int], Awaitable[None]]
    waited: int  # versions deferred since the last write started


class Versions:
    def __init__(self, store: CheckpointStore, metrics: Metrics, interval_s: float = 0.0
                 ) -> None:
        self.store = store
        self.metrics = metrics
        self.interval_s = interval_s
        self._sha: OrderedDict[tuple[str, int], str] = OrderedDict()
        self.recent = RecentWeights()
        # run_id -> the newest background checkpoint write (each awaits the one before)
        self._writing: dict[str, asyncio.Task] = {}
        self._started: dict[str, float] = {}  # run_id -> when its last background write began
        self._took: dict[str, float] = {}  # run_id -> how long its last background write took
        self._deferred: dict[str, _Deferred] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def _remember(self, run_id: str, version: int, sha: str) -> None:
        self._sha[(run_id, version)] = sha
        while len(self._sha) > _SHA_CACHE:
            self._sha.popitem(last=False)

    async def adapter_sha256(self, run_id: str, version: int) -> str:
        sha = self._sha.get((run_id, version))
        if sha is None:
            sha = await asyncio.to_thread(self.store.adapter_sha256, run_id, version)
            self._remember(run_id, version, sha)
        return sha

    def adapter_file(self, run_id: str, version: int) -> Path:
        return self.store.path(run_id, version) / ADAPTER_FILE

    def adapter_bytes(self, run_id: str, version: int) -> bytes | None:
        """The adapter file of a recent version, from memory (None: read the file)."""
        return self.recent.file(run_id, version)

    async def _serialize(self, run: Run, made: tuple[bytes, str] | None = None,
                         delta: bytes | None = None) -> bytes:
        """The adapter file's bytes (made and hashed in a thread, unless the
        caller ``made`` them already: ``make_adapter_file``), its sha256 remembered;
        its delta from the version before is computed behind it (unless given)."""
        if made is None:
            made = await asyncio.to_thread(make_adapter_file, run.adapter)
        data, sha = made
        self.recent.put(run.run_id, run.version, data, made=delta)
        self._remember(run.run_id, run.version, sha)
        return data

    def _write_sync(self, run: Run, adapter: bytes, sha: str | None, metrics: dict | None,
                    request_id: str | None) -> tuple[Path, int, set[int]]:
        t0 = time.monotonic()  # the write itself, not its wait for a thread
        path = self.store.write(
            run.run_id, run.version, adapter=run.adapter, adapter_bytes=adapter,
            adapter_sha256=sha,
            optimizer=run.opt_state,
            adapter_config=adapter_config_json(run.spec.lora, run.spec.base_model),
            parent_version=run.version - 1 if run.version else None, metrics=metrics,
            meta={"optimizer_step": run.opt_step, "run": run.spec.to_json(),
                  "history": run.history[-1000:], "request_id": request_id})
        size = sum(p.stat().st_size for p in path.iterdir())
        kept = set(self.store.versions(run.run_id))  # after retention pruned the oldest
        self._took[run.run_id] = time.monotonic() - t0
        return path, size, kept

    async def write(self, run: Run, *, metrics: dict | None = None,
                    request_id: str | None = None) -> Path:
        """Write ``run`` at its current version (in a thread), after any background
        write of the run still running (checkpoints land in version order)."""
        await self.flush(run.run_id)
        adapter = await self._serialize(run)
        return await self._write_now(run, adapter, metrics, request_id)

    async def flush(self, run_id: str | None = None) -> None:
        """Write the version of ``run_id`` (of every run when None) whose
        checkpoint waits its turn, and wait for the background writes to land."""
        for rid in list(self._deferred) if run_id is None else [run_id]:
            self._write_deferred(rid)
        tasks = list(self._writing.values()) if run_id is None else [
            t for t in (self._writing.get(run_id),) if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def forget(self, run_id: str) -> None:
        """A deleted run: its background writes land (so none writes into a removed
        directory), then its cached hashes and files go."""
        self._take_deferred(run_id)  # dropped: the run is gone
        self._started.pop(run_id, None)
        self._took.pop(run_id, None)
        await self.flush(run_id)
        for key in [k for k in self._sha if k[0] == run_id]:
            del self._sha[key]
        self.recent.forget(run_id)

    async def _write_now(self, run: Run, adapter: bytes, metrics: dict | None,
                         request_id: str | None) -> Path:
        t0 = time.monotonic()
        # Its sha256 was remembered when the bytes were made (``_serialize``):
        # the store does not hash them again.
        sha = self._sha.get((run.run_id, run.version))
        path, size, kept = await asyncio.to_thread(self._write_sync, run, adapter, sha, metrics,
                                                   request_id)
        # Pruned versions are gone from disk: forget them here too (a 404, not a
        # task no worker can fetch weights for). Newer ones may not be on disk
        # yet (written in the background), and ones never written (between two
        # kept checkpoints) are served from memory while they are held: they stay.
        oldest = min(kept, default=run.version)
        for key in [k for k in self._sha
                    if k[0] == run.run_id and k[1] < run.version and k[1] not in kept
                    and (k[1] < oldest or self.recent.file(run.run_id, k[1]) is None)]:
            del self._sha[key]
        self.metrics.checkpoint_seconds.observe(time.monotonic() - t0)
        self.metrics.checkpoint_bytes.labels(run.run_id).set(size)
        return path

    async def commit(self, run: Run, params: Tensors, state: Tensors, *, history_entry: dict,
                     opt_step: int | None = None, metrics: dict | None = None,
                     request_id: str | None = None,
                     background: Callable[[int], Awaitable[None]] | None = None,
                     adapter: tuple[bytes, str] | None = None,
                     delta: bytes | None = None, announce: bool = True) -> None:
        """Make version v+1 from new weights and optimizer state. Without
        ``background`` the checkpoint is written before the version becomes
        visible: a crash in between leaves the old version current and this one
        unannounced. With it (the caller's inputs are durable, so a replay can
        rebuild the version) the version is visible at once, served from memory,
        and its checkpoint is written behind it; ``background(version)`` runs once
        it has landed (dropping what the checkpoint now contains). ``adapter``:
        ``make_adapter_file(params)``, when the caller made it in its own thread;
        ``delta``: ``xor_delta`` from the current version's file to it, likewise.
        ``announce=False``: waiting leases are not told (``announce``) here;
        the caller tells them once its answer is on its way."""
        staged = dataclasses.replace(
            run, version=run.version + 1, adapter=params, opt_state=state,
            opt_step=run.opt_step if opt_step is None else opt_step,
            history=[*run.history, history_entry])
        metrics = metrics or {"loss": history_entry.get("loss")}
        if background is None:
            await self.write(staged, metrics=metrics, request_id=request_id)
        else:
            data = await self._serialize(staged, adapter, delta)
            self._write_behind(staged, data, metrics, request_id, background)
        run.version, run.adapter, run.opt_state, run.opt_step = (
            staged.version, params, state, staged.opt_step)
        run.history.append(history_entry)
        if history_entry.get("loss") is not None:
            run.last_loss = history_entry["loss"]
        self.metrics.version.labels(run.run_id).set(run.version)
        if announce:
            self.announce()

    def announce(self) -> None:
        """Tell waiting leases that runs are at new versions: they push them."""
        self.recent.announce()

    def _write_behind(self, staged: Run, adapter: bytes, metrics: dict, request_id: str | None,
                      landed: Callable[[int], Awaitable[None]]) -> None:
        run_id = staged.run_id
        now = time.monotonic()
        started = self._started.get(run_id)
        writing = self._writing.get(run_id)
        # Too soon after the last write began, or that write has not landed yet
        # (a slow disk): wait, so the steps a restart replays stay bounded.
        gap = max(self.interval_s,
                  min(self._took.get(run_id, 0.0) / WRITE_SHARE, MAX_WRITE_GAP_S))
        if self.interval_s > 0 and started is not None and (
                now - started < gap or (writing is not None and not writing.done())):
            before = self._deferred.get(run_id)
            waited = before.waited + 1 if before is not None else 1
            self._deferred[run_id] = _Deferred(staged, adapter, metrics, request_id, landed,
                                               waited)
            if waited >= MAX_DEFERRED:
                self._write_deferred(run_id)
            elif run_id not in self._timers:
                self._timers[run_id] = asyncio.get_running_loop().call_later(
                    max(started + gap - now, 0.05), self._write_deferred, run_id)
            return
        self._write_started(staged, adapter, metrics, request_id, landed)

    def _take_deferred(self, run_id: str) -> _Deferred | None:
        """The version of ``run_id`` waiting to be written (no longer waiting)."""
        timer = self._timers.pop(run_id, None)
        if timer is not None:
            timer.cancel()
        return self._deferred.pop(run_id, None)

    def _write_deferred(self, run_id: str) -> None:
        d = self._take_deferred(run_id)
        if d is not None:
            self._write_started(d.staged, d.adapter, d.metrics, d.request_id, d.landed)

    def _write_started(self, staged: Run, adapter: bytes, metrics: dict,
                       request_id: str | None, landed: Callable[[int], Awaitable[None]]
                       ) -> None:
        self._started[staged.run_id] = time.monotonic()
        before = self._writing.get(staged.run_id)

        async def write() -> None:
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)
            try:
                await self._write_now(staged, adapter, metrics, request_id)
                await landed(staged.version)
            except Exception:  # the version lives on in memory; a restart replays it
                log.exception("background checkpoint failed run=%s version=%d",
                              staged.run_id, staged.version)
            finally:
                if self._writing.get(staged.run_id) is task:
                    del self._writing[staged.run_id]

        task = asyncio.create_task(write())
        self._writing[staged.run_id] = task

    def _load_sync(self, spec: RunSpec) -> tuple[Run, dict] | None:
        version = self.store.latest(spec.run_id)
        if version is None:
            return None
        ck = self.store.load(spec.run_id, version)
        run = Run(spec=spec, version=version, adapter=ck.adapter, opt_state=ck.optimizer,
                  opt_step=int(ck.manifest.get("optimizer_step", 0)),
                  shapes={k: tuple(v.shape) for k, v in ck.adapter.items()},
                  history=list(ck.manifest.get("history", [])), shape=_shape(spec.base_model))
        return run, ck.manifest

    async def load(self, spec: RunSpec) -> tuple[Run, dict] | None:
        """The run at its newest valid checkpoint, with that checkpoint's manifest
        (None if version 0 never landed)."""
        loaded = await asyncio.to_thread(self._load_sync, spec)
        if loaded is not None:
            run, manifest = loaded
            self._remember(run.run_id, run.version, manifest["files"][ADAPTER_FILE]["sha256"])
            data = await asyncio.to_thread(self.adapter_file(run.run_id, run.version).read_bytes)
            self.recent.put(run.run_id, run.version, data, delta=False)
        return loaded


def make_adapter_file(adapter: Tensors) -> tuple[bytes, str]:
    """A version's adapter file: its bytes and their sha256."""
    return make_adapter_file_and_delta(adapter, None)[0]


# Above this size a new version's sha256 is taken in a second thread while its
# delta is computed: each is a pass over the file (45 MB: 29 and 98 ms), and
# the worker waiting for the version is idle meanwhile, so a core is free.
_HASH_BESIDE_BYTES = 1 << 20
# A few threads: runs stepping at once do not queue behind each other's hashes.
_hasher = ThreadPoolExecutor(max_workers=4, thread_name_prefix="version-sha256")


def make_adapter_file_and_delta(adapter: Tensors, before: bytes | None
                                ) -> tuple[tuple[bytes, str], bytes | None]:
    """``make_adapter_file(adapter)`` and the ``xor_delta`` from ``before`` (the
    current version's file; None: no delta) to it, side by side."""
    data = tensors_to_bytes(adapter, metadata={"format": "pt"})
    if before is None:
        return (data, hashlib.sha256(data).hexdigest()), None
    if len(data) < _HASH_BESIDE_BYTES:
        return (data, hashlib.sha256(data).hexdigest()), xor_delta(before, data)
    hashing = _hasher.submit(lambda: hashlib.sha256(data).hexdigest())
    delta = xor_delta(before, data)
    return (data, hashing.result()), delta


def _shape(model_id: str) -> ModelShape | None:
    """The base's sizes for placement; a base whose config cannot be read now
    (moved, offline) leaves the run placeable by precision only."""
    try:
        return shape_of(model_id)
    except (SignalError, OSError, ValueError):
        return None
