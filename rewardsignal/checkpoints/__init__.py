"""Versioned checkpoint store and exports."""

from rewardsignal.checkpoints.export import export_adapter, export_merged
from rewardsignal.checkpoints.store import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    Checkpoint,
    CheckpointStore,
    version_dirname,
)

__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_FILE", "Checkpoint", "CheckpointStore",
           "export_adapter", "export_merged", "version_dirname"]
