"""Python SDK: ``SignalClient`` (sync) and ``AsyncSignalClient``."""

from rewardsignal.sdk.client import AsyncRun, AsyncSignalClient
from rewardsignal.sdk.sync import Run, SignalClient

__all__ = ["AsyncRun", "AsyncSignalClient", "Run", "SignalClient"]
