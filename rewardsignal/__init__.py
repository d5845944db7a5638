"""Signal: federated LoRA fine-tuning on volunteer GPUs."""

__version__ = "0.1.0"

from rewardsignal.errors import SignalError  # noqa: E402
from rewardsignal.sdk import AsyncSignalClient, SignalClient  # noqa: E402

__all__ = ["AsyncSignalClient", "SignalClient", "SignalError", "__version__"]
