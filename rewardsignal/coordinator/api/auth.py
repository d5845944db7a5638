"""API keys (users) and worker tokens (workers): two scopes, stored hashed.

Keys come from the command line / environment and from the ``keys`` table of
the coordinator's database (``signal keys create``). Stored keys are looked up
on a thread of their own (never on the event loop) and re-read whenever another
process commits to the database, so a key created or revoked while the
coordinator runs takes effect from the next request on.
"""

from __future__ import annotations

import asyncio
import hmac
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from rewardsignal.coordinator.store.keys import KeyStore, key_hash
from rewardsignal.errors import AuthError

LOCAL_OWNER = "local"
_KEY_HINT = ("pass --api-key KEY on the command line, SignalClient(api_key=KEY) in Python, "
             "or set SIGNAL_API_KEY")


class Auth:
    def __init__(self, api_keys: tuple[str, ...], worker_tokens: tuple[str, ...],
                 db_path: Path | None = None) -> None:
        self._static = {"user": {key_hash(k) for k in api_keys},
                        "worker": {key_hash(k) for k in worker_tokens}}
        self._stored = KeyStore(db_path) if db_path is not None else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keys")

    async def _keys(self, scope: str) -> set[str]:
        if self._stored is None:
            return self._static[scope]
        stored = await asyncio.get_running_loop().run_in_executor(self._pool,
                                                                  self._stored.current)
        return self._static[scope] | stored[scope]

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

    async def user(self, request: web.Request) -> str:
        """The owner id of the caller's key (``local`` when no keys are set)."""
        users = await self._keys("user")
        if not users:
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
        if not workers:
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
