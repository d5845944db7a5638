"""``SignalClient``: a thin synchronous wrapper over ``AsyncSignalClient``.

One event loop runs in a daemon thread; each sync method submits the async
method's coroutine to it and blocks on the result. Works the same inside a
notebook that already runs a loop.

Each sync method is a real attribute of its class, made from the async method
by ``_sync`` (same name, signature and docstring), so ``help()``, ``dir()``,
``inspect.signature`` and IDEs see them; the implementation stays in one place.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from rewardsignal.sdk.client import AsyncRun, AsyncSignalClient
from rewardsignal.sdk.jobs import AsyncFederatedJob
from rewardsignal.sdk.transport import DEFAULT_RETRY_WINDOW_S

P = ParamSpec("P")
R = TypeVar("R")


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


class _Sync:
    """Holds the async object and the loop its coroutines run on."""

    def __init__(self, target: Any, loop: _LoopThread) -> None:
        self._target = target
        self._loop = loop

    def _wrap(self, result: Any) -> Any:
        if isinstance(result, AsyncRun):
            return Run(result, self._loop)
        if isinstance(result, AsyncFederatedJob):
            return FederatedJob(result, self._loop)
        return result

    def __repr__(self) -> str:
        return repr(self._target)


def _sync(fn: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]
          ) -> Callable[Concatenate[Any, P], Any]:
    """The blocking twin of an async method (runs, sync handles, Run/FederatedJob
    in place of their async types)."""
    name = fn.__name__

    @functools.wraps(fn)
    def method(self: _Sync, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self._wrap(self._loop.run(getattr(self._target, name)(*args, **kwargs)))

    return method


def _shutdown(target: AsyncSignalClient, loop: _LoopThread) -> None:
    if loop.thread.is_alive():
        loop.run(target.close())
        loop.stop()


class FederatedJob(_Sync):
    """A federated job handle: ``status()``, ``wait(timeout=...)``, ``cancel()``."""

    status = _sync(AsyncFederatedJob.status)
    cancel = _sync(AsyncFederatedJob.cancel)
    wait = _sync(AsyncFederatedJob.wait)

    @property
    def job_id(self) -> str:
        return self._target.job_id

    @property
    def request_id(self) -> str:
        return self._target.request_id


class Run(_Sync):
    """A run handle: ``forward_backward``, ``optim_step``, ``sample``, ``save_state``, ..."""

    info = _sync(AsyncRun.info)
    delete = _sync(AsyncRun.delete)
    list_artifacts = _sync(AsyncRun.list_artifacts)
    jobs = _sync(AsyncRun.jobs)
    evaluate = _sync(AsyncRun.evaluate)
    forward_backward = _sync(AsyncRun.forward_backward)
    forward = _sync(AsyncRun.forward)
    forward_backward_custom = _sync(AsyncRun.forward_backward_custom)
    optim_step = _sync(AsyncRun.optim_step)
    forward_backward_optim_step = _sync(AsyncRun.forward_backward_optim_step)
    sample = _sync(AsyncRun.sample)
    compute_logprobs = _sync(AsyncRun.compute_logprobs)
    save_state = _sync(AsyncRun.save_state)
    load_state = _sync(AsyncRun.load_state)
    train_federated = _sync(AsyncRun.train_federated)
    download = _sync(AsyncRun.download)

    @property
    def run_id(self) -> str:
        return self._target.run_id


class SignalClient(_Sync):
    """``SignalClient(api_key=..., base_url=...)``: the blocking client. The key
    defaults to ``SIGNAL_API_KEY`` and the URL to ``SIGNAL_URL`` (alias
    ``SIGNAL_COORDINATOR``); ``retry_window_s`` is how long a call rides out an
    unreachable coordinator. See ``AsyncSignalClient`` for the async twin."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, *,
                 timeout_s: float = 600.0,
                 retry_window_s: float = DEFAULT_RETRY_WINDOW_S) -> None:
        super().__init__(AsyncSignalClient(api_key, base_url, timeout_s=timeout_s,
                                           retry_window_s=retry_window_s), _LoopThread())
        # Close the HTTP session even if the caller never calls close().
        self._finalizer = weakref.finalize(self, _shutdown, self._target, self._loop)

    health = _sync(AsyncSignalClient.health)
    list_models = _sync(AsyncSignalClient.list_models)
    status = _sync(AsyncSignalClient.status)
    list_workers = _sync(AsyncSignalClient.list_workers)
    create_run = _sync(AsyncSignalClient.create_run)
    get_run = _sync(AsyncSignalClient.get_run)
    list_runs = _sync(AsyncSignalClient.list_runs)
    delete_run = _sync(AsyncSignalClient.delete_run)
    upload_dataset = _sync(AsyncSignalClient.upload_dataset)
    wait = _sync(AsyncSignalClient.wait)

    @property
    def api_key(self) -> str | None:
        return self._target.api_key

    @property
    def base_url(self) -> str:
        return self._target.base_url

    def run(self, run_id: str) -> Run:
        """A handle on an existing run."""
        return Run(self._target.run(run_id), self._loop)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> SignalClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
