"""API keys (users) and worker tokens (workers): two scopes, stored hashed.

Keys come from the command line / environment and from the ``keys`` table of
the coordinator's database (``signal keys create``). Stored keys are read on a
thread of their own (never on the event loop): again whenever ``signal keys``
has changed them (its stamp file, ``store.keys.stamp_path``, looked at on the
loop for each request), so a key created or revoked while the coordinator runs
takes effect from the next request on, and at least every ``RECHECK_S``
otherwise (a change made some other way). A request whose keys are fresh
costs no thread hop (a hop cost 0.5-1 ms on the path of a step on a busy
2-core machine, twice a step).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from rewardsignal.coordinator.store.keys import KeyStore, key_hash
from rewardsignal.errors import AuthError

LOCAL_OWNER = "local"
# Longest a stored key set is trusted without asking the database (seconds).
RECHECK_S = 1.0
_KEY_HINT = ("pass --api-key KEY on the command line, SignalClient(api_key=KEY) in Python, "
             "or set SIGNAL_API_KEY")


class Auth:
    def __init__(self, api_keys: tuple[str, ...], worker_tokens: tuple[str, ...],
                 db_path: Path | None = None) -> None:
        self._static = {"user": {key_hash(k) for k in api_keys},
                        "worker": {key_hash(k) for k in worker_tokens}}
        self._stored = KeyStore(db_path) if db_path is not None else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keys")
        # The stored keys as last read, the stamp seen before that read, and when.
        self._read: dict[str, set[str]] | None = None
        self._read_stamp: tuple | None = None
        self._read_at = 0.0

    async def _keys(self, scope: str) -> set[str]:
        if self._stored is None:
            return self._static[scope]
        stamp = self._stored.stamp()
        now = time.monotonic()
        if (self._read is None or stamp != self._read_stamp
                or now - self._read_at >= RECHECK_S):
            # The stamp is taken before the read: a change after it moves the
            # stamp again and is read on the next request.
            self._read = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._stored.current)
            self._read_stamp, self._read_at = stamp, now
        return self._static[scope] | self._read[scope]

    @staticmethod
    def _bearer(request: web.Request) -> str | None:
        """``Authorization: Bearer <key>``, or ``X-API-Key: <key>`` (what the
        Tinker SDK sends)."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header[len("Bearer "):].strip()
        return request.headers.get("X-API-Key") or None

    @staticmethod
    def _match(token: str | None, allowed: set[str]) -> str | None:
        if token is None:
            return None
        h = key_hash(token)
        return next((a for a in allowed if hmac.compare_digest(a, h)), None)

    def _switched_on(self, scope: str) -> bool:
        """Whether ``scope`` needs a key: one was given at start or stored, even
        if every stored one has been revoked since (that locks the scope)."""
        return bool(self._static[scope]) or (self._stored is not None
                                             and scope in self._stored.used)

    async def user(self, request: web.Request) -> str:
        """The owner id of the caller's key (``local`` when no keys are set)."""
        users = await self._keys("user")
        if not users and not self._switched_on("user"):
            return LOCAL_OWNER
        token = self._bearer(request)
        if token is None:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>' (or "
                            "'X-API-Key: <key>'); " + _KEY_HINT)
        h = self._match(token, users)
        if h is None:
            hint = (" (that is a worker token, which cannot use user endpoints)"
                    if self._match(token, await self._keys("worker")) else "")
            raise AuthError("invalid or revoked API key" + hint + "; " + _KEY_HINT)
        return h[:16]

    async def worker(self, request: web.Request) -> str:
        """Which worker token the caller holds (a prefix of its hash; "" when
        the coordinator requires none): two workers under one token are one
        volunteer to verification (``coordinator.trust``)."""
        workers = await self._keys("worker")
        if not workers and not self._switched_on("worker"):
            return ""
        h = self._match(self._bearer(request), workers)
        if h is None:
            raise AuthError("missing, invalid or revoked worker token: start the worker with "
                            "--token")
        return h[:16]

    def close(self) -> None:
        def close_store() -> None:
            if self._stored is not None:
                self._stored.close()

        self._pool.submit(close_store).result()
        self._pool.shutdown(wait=True)
