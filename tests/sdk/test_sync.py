"""The sync client's methods are real: visible to help(), dir(), inspect and IDEs,
with the async method's signature and docstring, and none is missing."""

from __future__ import annotations

import inspect

import pytest

from rewardsignal import AsyncSignalClient, SignalClient
from rewardsignal.errors import ValidationError
from rewardsignal.sdk.client import AsyncRun
from rewardsignal.sdk.jobs import AsyncFederatedJob
from rewardsignal.sdk.sync import FederatedJob, Run


def _coroutine_methods(cls) -> set[str]:
    return {n for n, f in vars(cls).items()
            if not n.startswith("_") and inspect.iscoroutinefunction(f)}


@pytest.mark.parametrize("sync_cls, async_cls", [
    (SignalClient, AsyncSignalClient), (Run, AsyncRun), (FederatedJob, AsyncFederatedJob)])
def test_every_async_method_has_a_real_sync_twin(sync_cls, async_cls):
    missing = {n for n in _coroutine_methods(async_cls) if n != "close"} - set(vars(sync_cls))
    assert not missing
    for name in _coroutine_methods(async_cls) - {"close"}:
        sync_fn, async_fn = getattr(sync_cls, name), getattr(async_cls, name)
        assert not inspect.iscoroutinefunction(sync_fn)
        assert inspect.signature(sync_fn) == inspect.signature(async_fn)
        assert sync_fn.__doc__ == async_fn.__doc__
        assert name in dir(sync_cls)


def test_signatures_show_the_arguments():
    params = inspect.signature(SignalClient.create_run).parameters
    assert {"base_model", "lora_r", "lora_target_modules", "learning_rate"} <= set(params)
    assert "push_to_hub" in inspect.signature(Run.save_state).parameters
    assert "Generate" in (Run.sample.__doc__ or "")


def test_url_from_signal_url_then_its_alias(monkeypatch):
    monkeypatch.delenv("SIGNAL_URL", raising=False)
    monkeypatch.setenv("SIGNAL_COORDINATOR", "http://127.0.0.1:8123/")
    with SignalClient() as old_name:
        assert old_name.base_url == "http://127.0.0.1:8123"
    monkeypatch.setenv("SIGNAL_URL", "http://127.0.0.1:8124")
    with SignalClient() as new_name:
        assert new_name.base_url == "http://127.0.0.1:8124"


def test_an_address_given_as_the_api_key_is_refused_with_the_fix():
    with pytest.raises(ValidationError, match="base_url='http://127.0.0.1:8011'"):
        SignalClient("http://127.0.0.1:8011")
    with pytest.raises(ValidationError, match="first argument"):
        AsyncSignalClient("https://signal.example")
