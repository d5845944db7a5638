"""Gradients accepted but not yet stepped: a safetensors file per request under
``<data_dir>/pending/<run_id>/`` plus a database row, both written before the
gradient counts, so a restart adds it back (or drops it, once a checkpoint
contains it)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from pathlib import Path

from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.coordinator.store.db import Database
from rewardsignal.protocol import tensors_from_bytes, tensors_to_bytes


def _load_tensors(path: Path) -> Tensors:
    """A stored gradient, read into memory (the accumulator holds it as it is: a
    view of a mapped file would change, or fault, with the file)."""
    return tensors_from_bytes(bytearray(path.read_bytes()))


def _save_tensors(tensors: Tensors, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(tensors_to_bytes(tensors))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _unlink_all(paths: list[str]) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)


class PendingGradients:
    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = Path(root)

    def save(self, *, request_id: str, run_id: str, version: int, grads: Tensors,
             weight: float, reduction: str, tokens: int, loss_sum: float,
             loss_weight: float, done: dict | None = None,
             keep_args: bool = False) -> Awaitable[None]:
        """The gradient's file and row; ``done``: its request's result, stored
        with the row (``Database.add_pending_grad_from_thread``). Sent to its
        thread now, not when awaited: the loop may be busy next (the step
        behind it starts AdamW there), and the step waits for this write."""
        path = self.root / run_id / f"{request_id}.safetensors"
        row = {"request_id": request_id, "run_id": run_id, "version": version,
               "path": str(path), "weight": weight, "reduction": reduction,
               "loss_sum": loss_sum, "loss_weight": loss_weight, "tokens": tokens}

        def save() -> None:
            # The file, then its row, in one trip off the loop: the loop is often
            # busy then (an optim_step's AdamW runs beside this write), and the
            # step waits for both.
            _save_tensors(grads, path)
            self.db.add_pending_grad_from_thread(row, done, keep_args=keep_args)

        return asyncio.get_running_loop().run_in_executor(None, save)

    async def drop_before(self, run_id: str, version: int) -> None:
        """Forget gradients computed before ``version``: a checkpoint holds them."""
        stale = await self.db.drop_pending_grads(run_id, version)
        await asyncio.to_thread(_unlink_all, stale)

    async def load(self, run_id: str) -> list[tuple[dict, Tensors]]:
        """(row, gradient) of each pending gradient of ``run_id``."""
        out = []
        for row in await self.db.pending_grads(run_id):
            out.append((row, await asyncio.to_thread(_load_tensors, Path(row["path"]))))
        return out
