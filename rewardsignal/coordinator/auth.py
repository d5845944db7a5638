"""API keys (users) and worker tokens (workers): two scopes, stored hashed."""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from rewardsignal.errors import AuthError

LOCAL_OWNER = "local"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Auth:
    def __init__(self, api_keys: tuple[str, ...], worker_tokens: tuple[str, ...]) -> None:
        self._users = {key_hash(k) for k in api_keys}
        self._workers = {key_hash(k) for k in worker_tokens}

    @property
    def open_users(self) -> bool:
        return not self._users

    @staticmethod
    def _bearer(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header[len("Bearer "):].strip()
        return None

    def _match(self, token: str | None, allowed: set[str]) -> str | None:
        if token is None:
            return None
        h = key_hash(token)
        return next((a for a in allowed if hmac.compare_digest(a, h)), None)

    def user(self, request: web.Request) -> str:
        """The owner id of the caller's key (``local`` when no keys are set)."""
        if not self._users:
            return LOCAL_OWNER
        token = self._bearer(request)
        if token is None:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        h = self._match(token, self._users)
        if h is None:
            raise AuthError("invalid API key" + (" (that is a worker token, which cannot use "
                                                 "user endpoints)" if self._match(
                                                     token, self._workers) else ""))
        return h[:16]

    def worker(self, request: web.Request) -> None:
        if not self._workers:
            return
        token = self._bearer(request)
        if self._match(token, self._workers) is None:
            raise AuthError("missing or invalid worker token: start the worker with --token")
