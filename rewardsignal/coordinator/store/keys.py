"""Stored API keys and worker tokens (hashed): created, listed and revoked by the
CLI while a coordinator may be running (its auth sees the change at once).

Each change, once committed, appends a line to a stamp file beside the
database (``stamp_path``), so a running coordinator learns of it from a
``stat`` on its event loop instead of asking SQLite on a thread for every request
(``KeyStore.stamp``; ``api.auth`` re-reads the keys when the stamp moved, and
at least once a second in case a change was made without it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path

from rewardsignal.coordinator.store.db import connect

log = logging.getLogger("signal.keys")


def stamp_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".keys-changed")


def _changed(db_path: Path) -> None:
    """After a committed change to the keys: one line appended to the stamp, so
    its size grows with every change (whatever the clock's granularity, and
    with several writers at once). The change is committed already: if the
    stamp cannot be written, a running coordinator still sees it within
    ``api.auth.RECHECK_S``, and this says so instead of failing."""
    try:
        fd = os.open(stamp_path(db_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{time.time_ns()} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("keys changed, but %s could not be written (%s): a running "
                    "coordinator applies the change within a second", stamp_path(db_path), exc)


def create_key(db_path: Path, name: str, scope: str, key_hash: str) -> None:
    conn = connect(db_path)
    try:
        conn.execute("INSERT INTO keys VALUES (?, ?, ?, ?, NULL)",
                     (name, scope, key_hash, time.time()))
    except sqlite3.IntegrityError:
        raise ValueError(f"a key named {name!r} already exists") from None
    finally:
        conn.close()
    _changed(db_path)


def list_keys(db_path: Path) -> list[dict]:
    conn = connect(db_path)
    try:
        return [{"name": r[0], "scope": r[1], "created": r[2], "revoked": r[3]}
                for r in conn.execute("SELECT name, scope, created, revoked FROM keys "
                                      "ORDER BY created")]
    finally:
        conn.close()


def revoke_key(db_path: Path, name: str) -> bool:
    conn = connect(db_path)
    try:
        cur = conn.execute("UPDATE keys SET revoked = ? WHERE name = ? AND revoked IS NULL",
                           (time.time(), name))
        revoked = cur.rowcount == 1
    finally:
        conn.close()
    if revoked:
        _changed(db_path)
    return revoked


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The active stored keys by scope, re-read only when another connection has
    committed to the database since the last look (SQLite's ``data_version``).
    Blocking: the coordinator calls it on a thread of its own."""

    def __init__(self, db_path: Path) -> None:
        self._db_path = db_path
        self._conn: sqlite3.Connection | None = None
        self._version = -1
        self._keys: dict[str, set[str]] = {"user": set(), "worker": set()}
        # Scopes with a stored key, revoked or not: keys stay switched on for a
        # scope once one was stored, so revoking the last one locks it, not opens it.
        self.used: frozenset[str] = frozenset()

    def stamp(self) -> tuple[int, int, int] | None:
        """The stamp file's identity (inode, size, modification time): it changes
        with every change made through ``create_key`` / ``revoke_key`` (its size
        grows). None while there is none. A ``stat``: cheap enough for the
        event loop."""
        try:
            st = os.stat(stamp_path(self._db_path))
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def current(self) -> dict[str, set[str]]:
        if self._conn is None:
            if not self._db_path.exists():
                return self._keys
            self._conn = connect(self._db_path)
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            fresh: dict[str, set[str]] = {"user": set(), "worker": set()}
            used = set()
            for scope, h, revoked in self._conn.execute("SELECT scope, hash, revoked FROM keys"):
                used.add(scope)
                if revoked is None:
                    fresh[scope].add(h)
            self._keys, self.used, self._version = fresh, frozenset(used), version
        return self._keys

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
