"""The adapters a worker holds, and how it gets a task's version: from its cache
(where versions pushed to it while it waited for work land, ``take``), from the
exact delta its lease carried (``protocol.xor_delta``, from the version it
held), or, when it is further behind or the delta does not check out, the full
download from the version's immutable URL.

Every adapter a worker computes on is checked against the task's
``weights_sha256``, whichever way it came.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import torch

from rewardsignal import protocol
from rewardsignal.errors import SignalError, ValidationError

# Versions kept (a run's current one and the one a delta applies to, for a few runs).
CACHE_VERSIONS = 4


class WeightCache:
    def __init__(self, keep: int = CACHE_VERSIONS) -> None:
        self.keep = keep
        # (run_id, version) -> (adapter file bytes, their tensors)
        self._held: OrderedDict[tuple[str, int],
                                tuple[bytes | bytearray, dict[str, torch.Tensor]]] = OrderedDict()
        self.bytes_downloaded = 0  # full adapters fetched
        self.bytes_delta = 0  # deltas applied

    def have(self) -> dict[str, int]:
        """The newest version held of each run (what the lease tells the coordinator)."""
        out: dict[str, int] = {}
        for run_id, version in self._held:
            out[run_id] = max(version, out.get(run_id, version))
        return out

    async def get(self, task: dict, download: Callable[[dict], Awaitable[bytes]]
                  ) -> dict[str, torch.Tensor]:
        """The task's adapter as tensors. ``download(task)``: the full file's bytes."""
        key = (task["run_id"], task["version"])
        if key in self._held:
            self._held.move_to_end(key)
            return self._held[key][1]
        raw: bytes | bytearray | None = self._from_delta(task)
        if raw is None:
            raw = await download(task)
            self.bytes_downloaded += len(raw)
            if hashlib.sha256(raw).hexdigest() != task["weights_sha256"]:
                raise SignalError("downloaded weights do not match their sha256; retrying later")
        return self._keep(key, raw)

    def held(self, run_id: str, version: int) -> dict[str, torch.Tensor] | None:
        """The tensors of a version held (None: not held)."""
        kept = self._held.get((run_id, version))
        return kept[1] if kept is not None else None

    def take(self, update: dict) -> bool:
        """A version pushed while this worker waited for work (a lease's
        ``version`` frame: run_id, version, weights_sha256, weights_delta from a
        version held): kept if it applies and checks out. False otherwise (the
        task on it then brings the weights as usual)."""
        run_id, version = update.get("run_id"), update.get("version")
        if (not isinstance(run_id, str) or type(version) is not int
                or not isinstance(update.get("weights_sha256"), str)):
            return False
        if (run_id, version) in self._held:
            return True
        raw = self._from_delta(update)
        if raw is None:
            return False
        try:
            self._keep((run_id, version), raw)
        except ValidationError:  # its sha256 matched: only a broken coordinator sends this
            return False
        return True

    def _keep(self, key: tuple[str, int], raw: bytes | bytearray) -> dict[str, torch.Tensor]:
        tensors = protocol.tensors_from_bytes(raw)
        self._held[key] = (raw, tensors)
        while len(self._held) > self.keep:
            self._held.popitem(last=False)
        return tensors

    def _from_delta(self, task: dict) -> bytearray | None:
        """The new file from the lease's delta and the version it starts from;
        None (download instead) when there is none, its base is not held, or the
        result is not the version's file bit for bit."""
        delta = task.get("weights_delta")
        if not isinstance(delta, dict) or delta.get("codec") not in (protocol.XOR_DELTA,
                                                                     protocol.XOR_DELTA_V1):
            return None
        base_version, data = delta.get("from_version"), delta.get("data")
        if not isinstance(base_version, int) or not isinstance(data, bytes | bytearray):
            return None
        base = self._held.get((task["run_id"], base_version))
        if base is None:
            return None
        try:
            raw = protocol.apply_xor_delta(base[0], data, delta["codec"])
        except ValidationError:
            return None
        if hashlib.sha256(raw).hexdigest() != task["weights_sha256"]:
            return None
        self.bytes_delta += len(data)
        return raw
