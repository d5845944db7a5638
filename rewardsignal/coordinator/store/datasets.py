"""Datasets uploaded for federated jobs: JSONL, checked line by line, stored
under ``<data_dir>/datasets`` with their owner."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from rewardsignal.errors import DataError, NotFoundError

_ID_CHARS = set("abcdef0123456789-ds")


class DatasetStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def save(self, owner: str, raw: bytes | bytearray, name: str = "dataset.jsonl") -> dict:
        """Check every line parses as a JSON object (errors name the line), then
        store. Example shapes are checked against the run's tokenizer when a job
        uses the dataset."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{name}: not UTF-8 text (byte {exc.start})") from None
        count = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{name} line {lineno}: invalid JSON ({exc.msg} at column "
                                f"{exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{name} line {lineno}: each line must be a JSON object")
            count += 1
        if count == 0:
            raise DataError(f"{name}: no examples")
        dataset_id = "ds-" + secrets.token_hex(6)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{dataset_id}.tmp"
        tmp.write_bytes(raw)
        os.replace(tmp, self.root / f"{dataset_id}.jsonl")
        meta = {"dataset_id": dataset_id, "owner": owner, "name": name, "num_examples": count,
                "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        (self.root / f"{dataset_id}.json").write_text(json.dumps(meta))
        return {k: v for k, v in meta.items() if k != "owner"}

    def load(self, owner: str, dataset_id: str) -> tuple[dict, list]:
        meta, numbered = self.load_lines(owner, dataset_id)
        return meta, [obj for _, obj in numbered]

    def load_lines(self, owner: str, dataset_id: str) -> tuple[dict, list[tuple[int, dict]]]:
        """The dataset's examples with their 1-based line numbers in the file."""
        if not isinstance(dataset_id, str) or not set(dataset_id) <= _ID_CHARS:
            raise NotFoundError(f"unknown dataset {dataset_id!r}")
        meta_file = self.root / f"{dataset_id}.json"
        if not meta_file.is_file():
            raise NotFoundError(f"unknown dataset {dataset_id!r}")
        meta = json.loads(meta_file.read_text())
        if meta["owner"] != owner:
            raise NotFoundError(f"unknown dataset {dataset_id!r}")
        lines = (self.root / f"{dataset_id}.jsonl").read_text().splitlines()
        return meta, [(n, json.loads(line)) for n, line in enumerate(lines, start=1)
                      if line.strip()]
