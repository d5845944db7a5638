"""The worker's cache of frozen base models, bounded by memory.

A volunteer box serves whatever runs the coordinator hands it, one base model
after another; keeping every base it ever loaded would fill the GPU after a few
runs. The cache keeps models in least-recently-used order and, before a new
base is loaded, unloads the oldest until the new one fits the byte budget (and,
on CUDA, the memory the device actually has free). Pure bookkeeping: loading,
measuring and freeing are the engine's.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable

import torch

from rewardsignal.worker.hardware import offered_memory_bytes

# Share of device memory the cached bases may take by default: the rest is for
# the activations of the task being computed (a 1B model at bf16 is 2 GB, its
# activations for a 16k-token micro-batch ~35 GB).
_DEVICE_SHARE = 0.6
# On CPU the process also holds datasets, weights of several versions and the
# HTTP buffers: half of physical memory.
_HOST_SHARE = 0.5


def default_budget_bytes(device: torch.device, offered_bytes: int | None = None,
                         gpus: list[int] | None = None) -> int:
    """The cache's share of the memory the worker has: of ``offered_bytes``
    (``--memory-gb``: what it told the coordinator it offers) when given, so
    that the cache never takes more than the worker offered; else of the
    memory of its GPUs (``gpus``, default the device's) or of the machine (CPU)."""
    share = _DEVICE_SHARE if device.type == "cuda" else _HOST_SHARE
    if offered_bytes is None:
        offered_bytes = offered_memory_bytes(device, None, gpus)
    return int(offered_bytes * share)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def release_device_memory(device: torch.device) -> None:
    """Return freed blocks to the driver, so the next load (or another process)
    sees them as free: PyTorch's caching allocator keeps them otherwise."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ModelCache:
    def __init__(self, budget_bytes: int, *,
                 free_bytes: Callable[[], int] | None = None,
                 on_evict: Callable[[str], None] | None = None) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"model cache budget must be > 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._free_bytes = free_bytes
        self._on_evict = on_evict
        self._models: OrderedDict[str, object] = OrderedDict()
        self._bytes: dict[str, int] = {}

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._models

    def __len__(self) -> int:
        return len(self._models)

    def model_ids(self) -> list[str]:
        """Least recently used first."""
        return list(self._models)

    @property
    def resident_bytes(self) -> int:
        return sum(self._bytes.values())

    def get(self, model_id: str):
        """The cached model (now the most recently used), or None."""
        model = self._models.get(model_id)
        if model is not None:
            self._models.move_to_end(model_id)
        return model

    def make_room(self, need_bytes: int) -> list[str]:
        """Unload least recently used models until ``need_bytes`` more fit the
        budget and the device's free memory. A model larger than the whole budget
        still gets loaded (after everything else is unloaded): refusing would only
        move the out-of-memory error to the task, where it is reported anyway."""
        evicted: list[str] = []
        while self._models and self._needs_room(need_bytes):
            # No local reference to the model survives this line, so on_evict's
            # release actually frees its memory.
            model_id = next(iter(self._models))
            del self._models[model_id], self._bytes[model_id]
            evicted.append(model_id)
            if self._on_evict is not None:
                self._on_evict(model_id)
        return evicted

    def _needs_room(self, need_bytes: int) -> bool:
        if self.resident_bytes + need_bytes > self.budget_bytes:
            return True
        return self._free_bytes is not None and self._free_bytes() < need_bytes

    def put(self, model_id: str, model, nbytes: int) -> None:
        self._models[model_id] = model
        self._models.move_to_end(model_id)
        self._bytes[model_id] = nbytes
