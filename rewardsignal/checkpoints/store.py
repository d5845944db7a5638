"""Versioned, immutable checkpoints of a run's LoRA adapter and optimizer state.

Layout under ``root/<run_id>/``::

    v000003/adapter_model.safetensors   LoRA weights, PEFT key names
    v000003/adapter_config.json         PEFT LoraConfig (loads with PeftModel.from_pretrained)
    v000003/optimizer.safetensors       optimizer state tensors
    v000003/manifest.json               version, parent, time, metrics, sha256 of each file
    names.json                          pinned names -> version (named saves survive retention)

A checkpoint is written to a temporary directory, every file fsynced, then
renamed into place and the parent directory fsynced: a crash leaves either the
whole new version or none of it, never a half-written one that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from rewardsignal.errors import CheckpointError, NotFoundError, ValidationError
from rewardsignal.protocol import tensors_to_bytes

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST_FILE = "manifest.json"
NAMES_FILE = "names.json"
FORMAT = "signal-checkpoint/1"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValidationError(f"checkpoint name {name!r} must be 1-64 characters of letters, "
                              "digits, '_', '.', '-', starting with a letter or digit")
    return name


def version_dirname(version: int) -> str:
    return f"v{version:06d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


@dataclass
class Checkpoint:
    version: int
    path: Path
    manifest: dict
    adapter_config: dict
    adapter: dict[str, torch.Tensor] = field(repr=False)
    optimizer: dict[str, torch.Tensor] = field(repr=False)


class CheckpointStore:
    """All runs' checkpoints under one root directory."""

    def __init__(self, root: str | Path, *, keep_last: int = 5) -> None:
        if keep_last < 1:
            raise ValidationError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def path(self, run_id: str, version: int) -> Path:
        return self.run_dir(run_id) / version_dirname(version)

    def write(self, run_id: str, version: int, *, adapter: dict[str, torch.Tensor],
              adapter_config: dict, optimizer: dict[str, torch.Tensor] | None = None,
              parent_version: int | None = None, metrics: dict | None = None,
              meta: dict | None = None, adapter_bytes: bytes | None = None,
              adapter_sha256: str | None = None) -> Path:
        """Write version ``version`` atomically; an existing version is never overwritten.
        ``adapter_bytes``: the adapter file already serialised (the bytes the
        caller serves), written as they are; ``adapter_sha256``: their hash, when
        the caller has it."""
        final = self.path(run_id, version)
        if final.exists():
            raise CheckpointError(f"checkpoint {final} already exists; versions are immutable")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            known = {ADAPTER_FILE: adapter_sha256} if adapter_bytes is not None else {}
            if adapter_bytes is None:
                adapter_bytes = tensors_to_bytes(adapter, metadata={"format": "pt"})
            contents = {
                ADAPTER_FILE: adapter_bytes,
                ADAPTER_CONFIG_FILE: json.dumps(adapter_config, indent=2,
                                                sort_keys=True).encode(),
                OPTIMIZER_FILE: tensors_to_bytes(optimizer or {}, metadata={"format": "pt"}),
            }
            files = {}
            for name, data in contents.items():
                _write_synced(tmp / name, data)
                sha = known.get(name) or hashlib.sha256(data).hexdigest()
                files[name] = {"sha256": sha, "bytes": len(data)}
            manifest = {
                "format": FORMAT, "run_id": run_id, "version": version,
                "parent_version": parent_version, "created_at": time.time(),
                "metrics": metrics or {}, "files": files, **(meta or {}),
            }
            # One line, by the C encoder: with an indent, json encodes in Python,
            # and a manifest holds up to 1,000 history entries (milliseconds of
            # CPU per version, beside a worker's compute on a small machine).
            _write_synced(tmp / MANIFEST_FILE,
                          json.dumps(manifest, sort_keys=True).encode())
            _fsync_path(tmp)
            os.replace(tmp, final)
            _fsync_path(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune(run_id)
        return final

    def versions(self, run_id: str) -> list[int]:
        """Versions with a committed directory, ascending (validity not checked)."""
        d = self.run_dir(run_id)
        if not d.is_dir():
            return []
        found = (_VERSION_DIR.match(p.name) for p in d.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def verify(self, run_id: str, version: int) -> dict:
        """The manifest, after checking every file against its sha256."""
        path = self.path(run_id, version)
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            raise NotFoundError(f"no checkpoint {version_dirname(version)} for run {run_id}") \
                from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / MANIFEST_FILE} is not valid JSON: {exc}") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != version:
            raise CheckpointError(f"{path / MANIFEST_FILE} is not a {FORMAT} manifest for "
                                  f"version {version}")
        for name, info in manifest["files"].items():
            p = path / name
            if not p.is_file():
                raise CheckpointError(f"{p} is missing")
            digest = sha256_file(p)
            if digest != info["sha256"]:
                raise CheckpointError(f"{p} is corrupt: sha256 {digest[:12]}... does not match "
                                      f"the manifest's {info['sha256'][:12]}...; restore it from "
                                      "a backup or load an earlier version")
        return manifest

    def adapter_sha256(self, run_id: str, version: int) -> str:
        """The adapter file's sha256 from the manifest (not re-hashed: the weights
        ETag and every task message carry it)."""
        try:
            manifest = json.loads((self.path(run_id, version) / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            raise NotFoundError(f"run {run_id} has no weights for version {version} (pruned "
                                "or not yet written)") from None
        return manifest["files"][ADAPTER_FILE]["sha256"]

    def load(self, run_id: str, version: int) -> Checkpoint:
        manifest = self.verify(run_id, version)
        path = self.path(run_id, version)
        return Checkpoint(
            version=version, path=path, manifest=manifest,
            adapter_config=json.loads((path / ADAPTER_CONFIG_FILE).read_text()),
            adapter=load_file(path / ADAPTER_FILE), optimizer=load_file(path / OPTIMIZER_FILE))

    def latest(self, run_id: str) -> int | None:
        """Newest version whose files verify; corrupt or partial ones are skipped."""
        for v in reversed(self.versions(run_id)):
            try:
                self.verify(run_id, v)
                return v
            except CheckpointError:
                continue
        return None

    def names(self, run_id: str) -> dict[str, int]:
        p = self.run_dir(run_id) / NAMES_FILE
        return json.loads(p.read_text()) if p.exists() else {}

    def pin(self, run_id: str, version: int, name: str) -> None:
        """Give ``version`` a name; named versions survive retention."""
        check_name(name)
        if not self.path(run_id, version).is_dir():
            raise NotFoundError(f"no checkpoint {version_dirname(version)} for run {run_id}")
        names = self.names(run_id)
        if names.get(name, version) != version:
            raise ValidationError(f"checkpoint name {name!r} already names version "
                                  f"{names[name]} of run {run_id}")
        names[name] = version
        _write_json_atomic(self.run_dir(run_id) / NAMES_FILE, names)

    def resolve(self, run_id: str, ref: str | int) -> int:
        """A version number, ``"latest"`` or a pinned name -> version."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            return int(ref)
        if ref == "latest":
            v = self.latest(run_id)
            if v is None:
                raise NotFoundError(f"run {run_id} has no valid checkpoint")
            return v
        names = self.names(run_id)
        if ref not in names:
            raise NotFoundError(f"run {run_id} has no checkpoint named {ref!r}")
        return names[ref]

    def prune(self, run_id: str) -> list[int]:
        """Delete versions beyond the newest ``keep_last`` that carry no name, and
        leftovers of interrupted writes. Returns the versions removed."""
        d = self.run_dir(run_id)
        for p in d.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        versions = self.versions(run_id)
        pinned = set(self.names(run_id).values())
        doomed = [v for v in versions[: -self.keep_last] if v not in pinned]
        for v in doomed:
            shutil.rmtree(self.path(run_id, v), ignore_errors=True)
        return doomed
