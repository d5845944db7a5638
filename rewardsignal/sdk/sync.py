"""``SignalClient``: a thin synchronous wrapper over ``AsyncSignalClient``.

One event loop runs in a daemon thread; each sync method submits the async
method's coroutine to it and blocks on the result. Works the same inside a
notebook that already runs a loop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import weakref
from typing import Any

from rewardsignal.sdk.client import AsyncFederatedJob, AsyncRun, AsyncSignalClient
from rewardsignal.sdk.transport import DEFAULT_RETRY_WINDOW_S


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="signal-sdk-loop")
        self.thread.start()

    def run(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class _SyncProxy:
    """Exposes the coroutine methods of an async object as blocking methods."""

    def __init__(self, target: Any, loop: _LoopThread) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            result = self._loop.run(attr(*args, **kwargs))
            if isinstance(result, AsyncRun):
                return Run(result, self._loop)
            if isinstance(result, AsyncFederatedJob):
                return FederatedJob(result, self._loop)
            return result

        return call

    def __repr__(self) -> str:
        return repr(self._target)


def _shutdown(target: AsyncSignalClient, loop: _LoopThread) -> None:
    if loop.thread.is_alive():
        loop.run(target.close())
        loop.stop()


class Run(_SyncProxy):
    """A run handle: ``forward_backward``, ``optim_step``, ``sample``, ``save_state``, ..."""

    @property
    def run_id(self) -> str:
        return self._target.run_id


class FederatedJob(_SyncProxy):
    """A federated job handle: ``status()``, ``wait(timeout=...)``, ``cancel()``."""

    @property
    def job_id(self) -> str:
        return self._target.job_id


class SignalClient(_SyncProxy):
    """``SignalClient(api_key=..., base_url=...)``: see ``AsyncSignalClient``."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, *,
                 timeout_s: float = 600.0,
                 retry_window_s: float = DEFAULT_RETRY_WINDOW_S) -> None:
        super().__init__(AsyncSignalClient(api_key, base_url, timeout_s=timeout_s,
                                           retry_window_s=retry_window_s), _LoopThread())
        # Close the HTTP session even if the caller never calls close().
        self._finalizer = weakref.finalize(self, _shutdown, self._target, self._loop)

    def run(self, run_id: str) -> Run:
        return Run(self._target.run(run_id), self._loop)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> SignalClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
