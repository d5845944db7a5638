"""Signal: federated LoRA fine-tuning on volunteer GPUs."""

from rewardsignal._version import __version__
from rewardsignal.errors import SignalError
from rewardsignal.sdk import AsyncSignalClient, SignalClient

__all__ = ["AsyncSignalClient", "SignalClient", "SignalError", "__version__"]
