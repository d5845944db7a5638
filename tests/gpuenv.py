"""Where GPU tests run: ``SIGNAL_TEST_GPU_DEVICE`` (default ``cuda``; ``cpu`` runs
them on the CPU for debugging), and the marks that skip them without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("SIGNAL_TEST_GPU_DEVICE", "cuda")
GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (CUDA is not available here)"),
]
