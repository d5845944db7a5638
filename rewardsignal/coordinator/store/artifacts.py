"""Saved states (``save_state``): exported adapter or merged-model directories
under ``<data_dir>/artifacts/<run_id>/<name>/`` with an ``artifact.json`` that
lists each file with its size and sha256. Blocking: call through a thread."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rewardsignal.checkpoints import CheckpointStore, export_adapter, export_merged
from rewardsignal.checkpoints.store import sha256_file
from rewardsignal.errors import ConflictError, NotFoundError


class ArtifactStore:
    def __init__(self, root: Path, checkpoints: CheckpointStore) -> None:
        self.root = Path(root)
        self.checkpoints = checkpoints

    def save(self, run_id: str, version: int, base_model: str, mode: str, name: str, *,
             precision: dict | None = None) -> dict:
        """Export ``version`` as ``name`` (idempotent for the same version and
        mode; another version under a taken name is a conflict)."""
        # Pinning keeps the full checkpoint (optimizer state too) past retention.
        self.checkpoints.pin(run_id, version, name)
        out = self.root / run_id / name
        meta_file = out / "artifact.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            if meta["version"] != version or meta["mode"] != mode:
                raise ConflictError(f"artifact {name!r} already holds version "
                                    f"{meta['version']} ({meta['mode']}); pick another name")
            return meta
        src = self.checkpoints.path(run_id, version)
        tmp = out.with_name(f".tmp-{name}")
        if mode == "merged":
            export_merged(src, base_model, tmp, precision=precision)
        else:
            export_adapter(src, tmp, precision=precision)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        meta = {"name": name, "run_id": run_id, "version": version, "mode": mode,
                "precision": precision, "checkpoint_path": f"signal://{run_id}/{name}",
                "files": [{"path": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                          for p in files]}
        (tmp / "artifact.json").write_text(json.dumps(meta, indent=2))
        tmp.replace(out)
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
