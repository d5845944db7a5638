"""API keys (users) and worker tokens (workers): two scopes, stored hashed.

Keys come from the command line / environment and from the ``keys`` table of
the coordinator's database (``signal keys create``). Database keys are re-read
whenever another process commits to the database (SQLite's ``data_version``),
so a key created or revoked while the coordinator runs takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from pathlib import Path

from aiohttp import web

from rewardsignal.errors import AuthError

LOCAL_OWNER = "local"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Auth:
    def __init__(self, api_keys: tuple[str, ...], worker_tokens: tuple[str, ...],
                 db_path: Path | None = None) -> None:
        self._static = {"user": {key_hash(k) for k in api_keys},
                        "worker": {key_hash(k) for k in worker_tokens}}
        self._db_path = db_path
        self._conn: sqlite3.Connection | None = None
        self._db_version = -1
        self._db_keys: dict[str, set[str]] = {"user": set(), "worker": set()}

    def _keys(self, scope: str) -> set[str]:
        if self._db_path is not None and self._db_path.exists():
            if self._conn is None:
                from rewardsignal.coordinator.db import connect

                self._conn = connect(self._db_path)
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._db_version:
                fresh: dict[str, set[str]] = {"user": set(), "worker": set()}
                for s, h in self._conn.execute(
                        "SELECT scope, hash FROM keys WHERE revoked IS NULL"):
                    fresh[s].add(h)
                self._db_keys, self._db_version = fresh, version
        return self._static[scope] | self._db_keys[scope]

    def has_keys(self, scope: str) -> bool:
        return bool(self._keys(scope))

    @staticmethod
    def _bearer(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header[len("Bearer "):].strip()
        return None

    @staticmethod
    def _match(token: str | None, allowed: set[str]) -> str | None:
        if token is None:
            return None
        h = key_hash(token)
        return next((a for a in allowed if hmac.compare_digest(a, h)), None)

    def user(self, request: web.Request) -> str:
        """The owner id of the caller's key (``local`` when no keys are set)."""
        users = self._keys("user")
        if not users:
            return LOCAL_OWNER
        token = self._bearer(request)
        if token is None:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        h = self._match(token, users)
        if h is None:
            hint = (" (that is a worker token, which cannot use user endpoints)"
                    if self._match(token, self._keys("worker")) else "")
            raise AuthError("invalid or revoked API key" + hint)
        return h[:16]

    def worker(self, request: web.Request) -> None:
        workers = self._keys("worker")
        if not workers:
            return
        if self._match(self._bearer(request), workers) is None:
            raise AuthError("missing, invalid or revoked worker token: start the worker with "
                            "--token")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
