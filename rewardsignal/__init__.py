"""Signal: federated LoRA fine-tuning on volunteer GPUs."""

__version__ = "0.1.0"
