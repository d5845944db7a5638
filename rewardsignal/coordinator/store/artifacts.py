"""Saved states (``save_state``): exported adapter or merged-model directories
under ``<data_dir>/artifacts/<run_id>/<name>/`` with an ``artifact.json`` that
lists each file with its size and sha256. A merged model's files are uploaded
by the worker that merged them into ``.upload-<task_id>/<lease_id>/`` first.
Blocking: call through a thread."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from rewardsignal.checkpoints import CheckpointStore, export_adapter
from rewardsignal.checkpoints.store import sha256_file
from rewardsignal.errors import ConflictError, NotFoundError


class ArtifactStore:
    def __init__(self, root: Path, checkpoints: CheckpointStore) -> None:
        self.root = Path(root)
        self.checkpoints = checkpoints

    def existing(self, run_id: str, version: int, mode: str, name: str) -> dict | None:
        """Pin ``version`` under ``name`` and return the saved state already
        there (the same version and mode: saving is idempotent), or None. Another
        version under a taken name is a conflict."""
        # Pinning keeps the full checkpoint (optimizer state too) past retention.
        self.checkpoints.pin(run_id, version, name)
        meta_file = self.root / run_id / name / "artifact.json"
        if not meta_file.exists():
            return None
        meta = json.loads(meta_file.read_text())
        if meta["version"] != version or meta["mode"] != mode:
            raise ConflictError(f"artifact {name!r} already holds version "
                                f"{meta['version']} ({meta['mode']}); pick another name")
        return meta

    def save(self, run_id: str, version: int, mode: str, name: str, *,
             precision: dict | None = None) -> dict:
        """Export ``version``'s adapter as ``name`` (idempotent, as ``existing``).
        A merged model is made by a worker (``upload_dir``, ``adopt``): the
        coordinator never loads a base model."""
        meta = self.existing(run_id, version, mode, name)
        if meta is not None:
            return meta
        tmp = self.root / run_id / f".tmp-{name}"
        export_adapter(self.checkpoints.path(run_id, version), tmp, precision=precision)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        return self._commit(tmp, run_id, version, mode, name, precision, [
            {"path": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files])

    def upload_dir(self, run_id: str, task_id: str, lease_id: str | None = None) -> Path:
        """Where a worker's files for an export task are written (one folder per
        lease, so two leases of one task never mix their files)."""
        d = self.root / run_id / f".upload-{task_id}"
        return d / lease_id if lease_id is not None else d

    def adopt(self, run_id: str, version: int, mode: str, name: str, task_id: str,
              lease_id: str, files: list[dict], precision: dict | None,
              complete: Callable[[Path], None]) -> dict:
        """The files a worker uploaded for ``task_id`` and listed in ``files``
        (their sizes and sha256 are the coordinator's own measure), checked and
        completed by ``complete(folder)`` (which raises to refuse them and may
        add files of its own), become saved state ``name``; nothing else of the
        task's uploads is kept."""
        src = self.upload_dir(run_id, task_id, lease_id)
        tmp = self.root / run_id / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for f in files:
                (src / f["path"]).replace(tmp / f["path"])
            complete(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(self.upload_dir(run_id, task_id), ignore_errors=True)
        uploaded = {f["path"] for f in files}
        own = [{"path": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
               for p in sorted(tmp.iterdir()) if p.is_file() and p.name not in uploaded]
        return self._commit(tmp, run_id, version, mode, name, precision,
                            sorted([*files, *own], key=lambda f: f["path"]))

    def sweep(self) -> int:
        """Remove what exports left half-done (a restart mid-upload or mid-export:
        ``.upload-*`` and ``.tmp-*`` folders); how many. At start-up only."""
        gone = 0
        for d in self.root.glob("*/.*") if self.root.is_dir() else ():
            if d.is_dir() and d.name.startswith((".upload-", ".tmp-")):
                shutil.rmtree(d, ignore_errors=True)
                gone += 1
        return gone

    def drop_uploads(self, run_id: str, task_id: str) -> None:
        shutil.rmtree(self.upload_dir(run_id, task_id), ignore_errors=True)

    def _commit(self, tmp: Path, run_id: str, version: int, mode: str, name: str,
                precision: dict | None, files: list[dict]) -> dict:
        meta = {"name": name, "run_id": run_id, "version": version, "mode": mode,
                "precision": precision, "checkpoint_path": f"signal://{run_id}/{name}",
                "files": files}
        (tmp / "artifact.json").write_text(json.dumps(meta, indent=2))
        tmp.replace(self.root / run_id / name)
        return meta

    def list(self, run_id: str) -> list[dict]:
        """Every saved state of a run, oldest version first."""
        run_dir = self.root / run_id
        metas = [json.loads(p.read_text()) for p in run_dir.glob("*/artifact.json")
                 if not p.parent.name.startswith(".")] if run_dir.is_dir() else []
        return sorted(metas, key=lambda m: (m["version"], m["name"]))

    def delete_run(self, run_id: str) -> None:
        shutil.rmtree(self.root / run_id, ignore_errors=True)

    def get(self, run_id: str, name: str) -> tuple[dict, Path]:
        out = self.root / run_id / name
        if "/" in name or name.startswith(".") or not (out / "artifact.json").is_file():
            raise NotFoundError(f"run {run_id} has no saved state named {name!r}")
        return json.loads((out / "artifact.json").read_text()), out

    def file(self, run_id: str, name: str, filename: str) -> tuple[Path, int]:
        """A file of a saved state, with its size."""
        meta, directory = self.get(run_id, name)
        if filename not in {f["path"] for f in meta["files"]}:
            raise NotFoundError(f"saved state {meta['name']!r} has no file {filename!r}")
        path = directory / filename
        return path, path.stat().st_size
