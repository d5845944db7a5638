"""Durable coordinator state in SQLite (WAL): keys, runs, requests (the ordered
operations of each run, with their results), gradients accepted but not yet
stepped, workers and federated jobs.

All access goes through one connection on one dedicated thread, so callers on
the event loop ``await`` it and never block the loop on disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from rewardsignal.coordinator.store.seen_keys import SeenKeys, bitmap_of

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY, scope TEXT NOT NULL CHECK (scope IN ('user', 'worker')),
    hash TEXT NOT NULL UNIQUE, created REAL NOT NULL, revoked REAL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, owner TEXT NOT NULL, spec TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, owner TEXT NOT NULL,
    run_id TEXT NOT NULL, kind TEXT NOT NULL, args TEXT NOT NULL, timeout_s REAL,
    status TEXT NOT NULL, result TEXT, created REAL NOT NULL, finished REAL);
CREATE INDEX IF NOT EXISTS requests_open ON requests (status, run_id, seq);
CREATE INDEX IF NOT EXISTS requests_seq ON requests (seq);
CREATE TABLE IF NOT EXISTS pending_grads (
    request_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, version INTEGER NOT NULL,
    path TEXT NOT NULL, weight REAL NOT NULL, reduction TEXT NOT NULL, loss_sum REAL NOT NULL,
    loss_weight REAL NOT NULL, tokens INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY, name TEXT NOT NULL, info TEXT NOT NULL,
    registered REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reputation (
    worker_id TEXT PRIMARY KEY, state TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, owner TEXT NOT NULL, state TEXT NOT NULL,
    updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (
    owner TEXT NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL, ref TEXT NOT NULL,
    answer TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (owner, key));
CREATE TABLE IF NOT EXISTS frontend (
    namespace TEXT NOT NULL, key TEXT NOT NULL, owner TEXT NOT NULL, value TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (namespace, key));
"""

# How long an idempotency key is honoured: a retry with the same key within this
# window gets the original request (or run) back instead of a new one.
KEY_TTL_S = 7 * 86400


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)  # autocommit; explicit transactions
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(SCHEMA)
    return conn


@contextmanager
def _unsynced(c: sqlite3.Connection) -> Iterator[None]:
    """One transaction committed without its own fsync (WAL, synchronous=NORMAL):
    it survives a crash of the process at once, and power loss from the next
    synced commit on (the WAL is synced in order, earlier frames with later ones).
    For records a restart can do without: a finished request whose record is
    lost is simply run again, and gives the same result. Accepting a request
    stays synced: that is the promise made by the 202."""
    c.execute("PRAGMA synchronous=NORMAL")
    try:
        with c:
            c.execute("BEGIN")
            yield
    finally:
        c.execute("PRAGMA synchronous=FULL")


def _pack(obj: Any) -> bytes | str:
    """A request's arguments or result for its row: msgpack (a batch's token ids
    and a result's per-token logprobs encode and parse several times faster than
    as JSON), or JSON text for what msgpack cannot hold (an int beyond 64 bits,
    a string with a lone surrogate).
    Rows written as JSON text by earlier versions read back the same way."""
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):  # ValueError: a lone surrogate in a str
        return json.dumps(obj)


def _unpack(stored: bytes | str) -> Any:
    if isinstance(stored, bytes):
        return msgpack.unpackb(stored, raw=False, strict_map_key=False)
    return json.loads(stored)


@dataclass(frozen=True)
class NewRequest:
    """An accepted request's row (``Database.add_requests``)."""
    request_id: str
    kind: str
    args: dict
    timeout_s: float | None


class Database:
    """``keep_finished``: finished requests kept for clients that come back late
    for their result (older ones are pruned)."""

    def __init__(self, path: Path, keep_finished: int = 10_000) -> None:
        self.path = Path(path)
        self.keep_finished = keep_finished
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._seq = 0
        self.seen_keys = SeenKeys()  # every key is added before its write is queued

    async def _do(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.path)
            row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM requests").fetchone()
            self._seq = row[0]
            self._conn.execute("DELETE FROM idempotency WHERE created < ?",
                               (time.time() - KEY_TTL_S,))
        return self._conn

    def _claim_key(self, c: sqlite3.Connection, owner: str, key: str | None, kind: str,
                   ref: str, answer: dict) -> None:
        """Inside the caller's transaction: record ``key``, so that the row it
        guards and the key commit (or not) together."""
        if key is not None:
            # A key stored unseen could be answered "not used" (find_key_soon).
            assert self.seen_keys.may_hold(owner, key), "add the key to seen_keys first"
            c.execute("INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?)",
                      (owner, key, kind, ref, json.dumps(answer), time.time()))

    async def key_suffixes(self, owner: str, prefix: str) -> list[str]:
        """What follows ``prefix`` in each of ``owner``'s idempotency keys that
        start with it."""
        rows = await self._do(lambda: self._c().execute(
            "SELECT key FROM idempotency WHERE owner = ? AND key >= ? AND key < ?",
            (owner, prefix, prefix + "\U0010ffff")).fetchall())
        return [r[0][len(prefix):] for r in rows]

    async def find_key(self, owner: str, key: str) -> dict | None:
        """What ``key`` of ``owner`` created: ``{kind, ref, answer}``, or None."""
        return await self.find_key_soon(owner, key)

    def find_key_soon(self, owner: str, key: str) -> asyncio.Future[dict | None]:
        """``find_key``, sent to the database thread now (not when first
        awaited): the caller does other work while it runs. A key the database
        cannot hold (``seen_keys``) is answered at once, without the trip."""
        if not self.seen_keys.may_hold(owner, key):
            done: asyncio.Future[dict | None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

        def find() -> dict | None:
            row = self._c().execute(
                "SELECT kind, ref, answer FROM idempotency WHERE owner = ? AND key = ?",
                (owner, key)).fetchone()
            return None if row is None else {"kind": row[0], "ref": row[1],
                                              "answer": json.loads(row[2])}

        return asyncio.get_running_loop().run_in_executor(self._pool, find)

    async def open(self) -> None:
        """Connect, and learn the keys stored before (``seen_keys``)."""
        self.seen_keys.load(await self._do(lambda: bitmap_of(
            self._c().execute("SELECT owner, key FROM idempotency"))))

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._do(close)
        self._pool.shutdown(wait=True)

    # -- runs ------------------------------------------------------------------------
    async def save_run(self, run_id: str, owner: str, spec: dict,
                       idem_key: str | None = None) -> None:
        if idem_key is not None:
            self.seen_keys.add(owner, idem_key)

        def save() -> None:
            c = self._c()
            with c:
                c.execute("BEGIN IMMEDIATE")
                c.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?)",
                          (run_id, owner, json.dumps(spec), time.time()))
                self._claim_key(c, owner, idem_key, "run", run_id, {"run_id": run_id})

        await self._do(save)

    async def delete_run(self, run_id: str) -> list[str]:
        """Forget a run in one transaction: its row, requests, pending gradients,
        jobs and the idempotency keys that point at them. Returns the pending
        gradients' file paths (the caller removes the files)."""
        def delete() -> list[str]:
            c = self._c()
            with c:
                c.execute("BEGIN IMMEDIATE")
                paths = [r[0] for r in c.execute(
                    "SELECT path FROM pending_grads WHERE run_id = ?", (run_id,))]
                c.execute("DELETE FROM idempotency WHERE ref = ? OR ref IN (SELECT request_id "
                          "FROM requests WHERE run_id = ?)", (run_id, run_id))
                for table in ("pending_grads", "requests", "jobs", "runs"):
                    c.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            return paths

        return await self._do(delete)

    async def runs(self) -> list[dict]:
        rows = await self._do(lambda: self._c().execute(
            "SELECT spec FROM runs ORDER BY created").fetchall())
        return [json.loads(r[0]) for r in rows]

    # -- requests ----------------------------------------------------------------------
    def add_requests(self, owner: str, run_id: str, requests: Sequence[NewRequest], *,
                     idem_key: str | None = None, key_kind: str = "request",
                     answer: dict | None = None) -> asyncio.Future[None]:
        """Store accepted requests of one run, in their order, in one transaction
        with the idempotency key and the answer the client was given: all of them
        or none. The write is queued now, on the event loop, ahead of every
        database write asked for after this call (one thread runs them in order);
        the future is done once it is synced."""
        def add() -> None:
            c = self._c()
            with c:
                c.execute("BEGIN IMMEDIATE")
                now = time.time()
                for r in requests:
                    self._seq += 1
                    c.execute("INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', "
                              "NULL, ?, NULL)", (r.request_id, self._seq, owner, run_id, r.kind,
                                                 _pack(r.args), r.timeout_s, now))
                self._claim_key(c, owner, idem_key, key_kind, requests[0].request_id,
                                answer or {})

        if idem_key is not None:
            self.seen_keys.add(owner, idem_key)
        return asyncio.get_running_loop().run_in_executor(self._pool, add)

    async def finish_request(self, request_id: str, status: str, result: dict, *,
                             keep_args: bool = False) -> None:
        """``keep_args``: the arguments stay (a replayable operation, which a
        restart may have to apply again); otherwise they are dropped."""
        def finish() -> None:
            c = self._c()
            with _unsynced(c):
                self._finish(c, request_id, status, result, keep_args)

        await self._do(finish)

    def _finish(self, c: sqlite3.Connection, request_id: str, status: str, result: dict,
                keep_args: bool) -> None:
        """Inside the caller's transaction: a request's outcome."""
        c.execute("UPDATE requests SET status = ?, result = ?, finished = ?, "
                  "args = CASE WHEN ? THEN args ELSE '{}' END WHERE request_id = ?",
                  (status, _pack(result), time.time(), keep_args, request_id))
        # By the seq index: only the few rows past the window are visited
        # (a scan of every kept row cost 3.5 ms per request at 10,000).
        c.execute("DELETE FROM requests WHERE seq < ? AND status != 'pending'",
                  (self._seq - self.keep_finished,))

    async def open_requests(self) -> list[dict]:
        rows = await self._do(lambda: self._c().execute(
            "SELECT request_id, owner, run_id, kind, args, timeout_s FROM requests "
            "WHERE status = 'pending' ORDER BY seq").fetchall())
        return [{"request_id": r[0], "owner": r[1], "run_id": r[2], "kind": r[3],
                 "args": _unpack(r[4]), "timeout_s": r[5]} for r in rows]

    async def done_requests(self, run_id: str, kind: str) -> list[dict]:
        """Finished requests of one kind on a run, in order, with their arguments
        (those kept by ``keep_args``) and results."""
        rows = await self._do(lambda: self._c().execute(
            "SELECT request_id, args, result FROM requests WHERE run_id = ? AND kind = ? "
            "AND status = 'done' ORDER BY seq", (run_id, kind)).fetchall())
        return [{"request_id": r[0], "args": _unpack(r[1]), "result": _unpack(r[2])}
                for r in rows]

    async def finished_request(self, request_id: str) -> dict | None:
        row = await self._do(lambda: self._c().execute(
            "SELECT owner, run_id, kind, status, result FROM requests WHERE request_id = ? "
            "AND status != 'pending'", (request_id,)).fetchone())
        if row is None:
            return None
        return {"owner": row[0], "run_id": row[1], "kind": row[2], "status": row[3],
                "result": _unpack(row[4])}

    # -- gradients accepted but not yet stepped ----------------------------------------------
    def add_pending_grad_from_thread(self, row: dict, done: dict | None = None, *,
                                     keep_args: bool = False) -> None:
        """A pending gradient's row, from a thread other than the loop's (which
        waits for it there): the thread that has just written the gradient's
        file records it without a hop back to a busy loop in between. ``done``:
        its request's result, recorded in the same transaction (as
        ``finish_request`` would: one trip for both, and neither without the
        other). Unsynced (its file is): until the next synced commit, power loss
        may take it with the request's answer, and the request runs again."""
        self._pool.submit(self._add_pending_grad, row, done, keep_args).result()

    def _add_pending_grad(self, row: dict, done: dict | None, keep_args: bool) -> None:
        c = self._c()
        with _unsynced(c):
            c.execute("INSERT OR REPLACE INTO pending_grads VALUES (:request_id, :run_id, "
                      ":version, :path, :weight, :reduction, :loss_sum, :loss_weight, "
                      ":tokens)", row)
            if done is not None:
                self._finish(c, row["request_id"], "done", done, keep_args)

    async def pending_grads(self, run_id: str) -> list[dict]:
        def fetch() -> list[dict]:
            # In the order they were accepted: a replayed step adds them up the same way.
            cur = self._c().execute("SELECT * FROM pending_grads WHERE run_id = ? "
                                    "ORDER BY rowid", (run_id,))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

        return await self._do(fetch)

    async def drop_pending_grads(self, run_id: str, before_version: int) -> list[str]:
        def drop() -> list[str]:
            c = self._c()
            paths = [r[0] for r in c.execute(
                "SELECT path FROM pending_grads WHERE run_id = ? AND version < ?",
                (run_id, before_version))]
            c.execute("DELETE FROM pending_grads WHERE run_id = ? AND version < ?",
                      (run_id, before_version))
            return paths

        return await self._do(drop)

    # -- workers and jobs ----------------------------------------------------------------------
    async def save_worker(self, worker_id: str, name: str, info: dict) -> None:
        await self._do(lambda: self._c().execute(
            "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?)",
            (worker_id, name, json.dumps(info), time.time())))

    async def delete_workers(self, worker_ids: list[str]) -> None:
        await self._do(lambda: self._c().executemany(
            "DELETE FROM workers WHERE worker_id = ?", [(w,) for w in worker_ids]))

    async def workers(self) -> list[dict]:
        rows = await self._do(lambda: self._c().execute(
            "SELECT worker_id, info FROM workers").fetchall())
        return [{"worker_id": r[0], **json.loads(r[1])} for r in rows]

    async def save_reputation(self, row: dict) -> None:
        """A worker's verification record (``coordinator.trust.reputation``)."""
        await self._do(lambda: self._c().execute(
            "INSERT OR REPLACE INTO reputation VALUES (?, ?, ?)",
            (row["worker_id"], json.dumps(row), time.time())))

    async def reputations(self) -> list[dict]:
        rows = await self._do(lambda: self._c().execute(
            "SELECT state FROM reputation").fetchall())
        return [json.loads(r[0]) for r in rows]

    async def save_job(self, job_id: str, run_id: str, owner: str, state: dict) -> None:
        await self._do(lambda: self._c().execute(
            "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?)",
            (job_id, run_id, owner, json.dumps(state), time.time())))

    async def jobs(self) -> list[dict]:
        rows = await self._do(lambda: self._c().execute(
            "SELECT state FROM jobs ORDER BY updated").fetchall())
        return [json.loads(r[0]) for r in rows]

    # -- names a front end gives to runs and versions (e.g. Tinker model ids) -----------
    async def put_name(self, namespace: str, key: str, owner: str, value: dict) -> None:
        await self._do(lambda: self._c().execute(
            "INSERT OR REPLACE INTO frontend VALUES (?, ?, ?, ?, ?)",
            (namespace, key, owner, json.dumps(value), time.time())))

    async def names(self, namespace: str) -> list[tuple[str, str, dict]]:
        """(key, owner, value) of every name in ``namespace``, oldest first."""
        rows = await self._do(lambda: self._c().execute(
            "SELECT key, owner, value FROM frontend WHERE namespace = ? ORDER BY created",
            (namespace,)).fetchall())
        return [(k, o, json.loads(v)) for k, o, v in rows]
