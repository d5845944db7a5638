"""Federated jobs on disk: their state in the database, their tokenised data in
``<data_dir>/jobs/<job_id>.json`` (written once, atomically)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from rewardsignal.coordinator.store.db import Database


class JobStore:
    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = Path(root)

    def datums_path(self, job_id: str) -> Path:
        return self.root / f"{job_id}.json"

    def _write_datums(self, job_id: str, data: Callable[[], dict]) -> None:
        path = self.datums_path(job_id)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data()))
        tmp.replace(path)

    async def save(self, job_id: str, run_id: str, owner: str, state: dict,
                   datums: Callable[[], dict]) -> None:
        """``datums()`` (``{"train": [...], "eval": [...]}`` in JSON form) is
        written the first time only; ``state`` every time."""
        await asyncio.to_thread(self._write_datums, job_id, datums)
        await self.db.save_job(job_id, run_id, owner, state)

    def read_datums(self, job_id: str) -> dict:
        return json.loads(self.datums_path(job_id).read_text())
