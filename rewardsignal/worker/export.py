"""Merged exports made on the worker (``save_state(mode="merged")``): the
version's adapter merged into the full-precision base, written with
``save_pretrained``, and each weights file uploaded to the coordinator, which
measures and hashes it as it writes it, then checks it against the base and
the adapter one tensor at a time. The coordinator never loads the base."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from rewardsignal import protocol
from rewardsignal.checkpoints import export_merged
from rewardsignal.checkpoints.export import MERGED_WEIGHT_SUFFIXES
from rewardsignal.checkpoints.store import ADAPTER_CONFIG_FILE, ADAPTER_FILE, sha256_file
from rewardsignal.errors import error_from_json
from rewardsignal.precision import Precision

if TYPE_CHECKING:
    from rewardsignal.worker.engine import Engine
    from rewardsignal.worker.status import StatusLine

_CHUNK = 4 << 20


async def export_task(task: dict, adapter: dict, compute: Executor, engine: Engine,
                      session: aiohttp.ClientSession, base_url: str, headers: dict,
                      status: StatusLine) -> dict:
    """An ``export_merged`` task: merge the version into the base (on the
    worker's ``compute`` thread), upload the files, and the result that lists
    them."""
    tmp_dir = work_dir()
    tmp = tmp_dir.name
    loop = asyncio.get_running_loop()
    try:
        files = await loop.run_in_executor(compute, merge, task, adapter, Path(tmp))
        fingerprint = await loop.run_in_executor(compute, engine.fingerprint,
                                                 task["base_model"], Precision.from_json(task))

        def progress(done: str) -> None:
            status.update("uploading", task=task["kind"], run=task["run_id"], bytes=done)

        await upload(session, base_url, headers, task, Path(tmp) / "merged", files, progress)
    finally:  # a whole model's files: removed off the event loop
        await asyncio.to_thread(tmp_dir.cleanup)
    return {"fingerprint": fingerprint, "version": task["version"], "result": {"files": files}}


def merge(task: dict, adapter: dict, work_dir: Path) -> list[dict]:
    """Write the merged model of ``task``'s version under ``work_dir/merged``;
    each file with its size and sha256. Blocking: run it in a thread."""
    payload = task["payload"]
    ckpt = work_dir / "adapter"
    ckpt.mkdir()
    (ckpt / ADAPTER_FILE).write_bytes(protocol.tensors_to_bytes(adapter,
                                                                metadata={"format": "pt"}))
    (ckpt / ADAPTER_CONFIG_FILE).write_text(json.dumps(payload["adapter_config"]))
    out = work_dir / "merged"
    export_merged(ckpt, task["base_model"], out, precision=payload.get("precision"),
                  source=payload.get("source"))
    # Only the weights travel: the coordinator writes the config and tokenizer
    # from the base's own files once it has checked them.
    return [{"path": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(out.iterdir())
            if p.is_file() and p.name.endswith(MERGED_WEIGHT_SUFFIXES)]


async def upload(session: aiohttp.ClientSession, base_url: str, headers: dict, task: dict,
                 directory: Path, files: list[dict],
                 progress: Callable[[str], None]) -> None:
    """PUT each file to ``/v1/tasks/{task_id}/files/{name}``, streamed from
    disk, with its size and sha256 (the coordinator reserves the size from the
    export's budget first); a refusal is raised as the coordinator's error."""
    total = sum(f["bytes"] for f in files)
    sent = 0
    for f in files:
        async def chunks(path: Path = directory / f["path"]) -> AsyncIterator[bytes]:
            nonlocal sent
            with open(path, "rb") as fh:  # noqa: ASYNC230 (reads go through a thread)
                while chunk := await asyncio.to_thread(fh.read, _CHUNK):
                    sent += len(chunk)
                    progress(f"{sent / 1e6:.1f}/{total / 1e6:.1f} MB")
                    yield chunk

        url = f"{base_url.rstrip('/')}/v1/tasks/{task['task_id']}/files/{f['path']}"
        async with session.put(url, data=chunks(), params={"lease_id": task["lease_id"]},
                               headers={**headers, "X-Signal-Sha256": f["sha256"],
                                        "Content-Length": str(f["bytes"])},
                               timeout=aiohttp.ClientTimeout(total=None, sock_read=600)) as resp:
            if resp.status >= 400:
                try:
                    body = json.loads(await resp.read())
                except ValueError:
                    body = None
                raise error_from_json(resp.status, body)


def work_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="signal-export-")
