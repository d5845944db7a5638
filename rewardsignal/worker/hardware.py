"""What a worker has: device, GPU names and memory, dtype support, and the task
size it can take."""

from __future__ import annotations

import os
import platform

import torch

from rewardsignal.errors import ValidationError

# Rough device bytes per token in flight for a 7B-class model in bf16 with LoRA
# (activations kept for backward plus logits); used only when the user gives no
# --max-tokens-per-task. Workers also split micro-batches on OOM, so an
# optimistic guess costs a retry, not a lost task.
_BYTES_PER_TOKEN_GPU = 1 << 20
_CPU_TASK_TOKENS = 8192


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValidationError(f"--device {spec}: CUDA is not available on this machine "
                                  "(is a CUDA build of torch installed?); use --device cpu")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValidationError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s)")
        return dev
    raise ValidationError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def worker_gpus(device: torch.device, device_map: str | None = None) -> list[int]:
    """The GPUs a worker computes on: its device's, or with ``device_map="auto"``
    every GPU it sees (a base model spread over them, ``models.load_model``)."""
    if device.type != "cuda":
        return []
    if device_map == "auto":
        return list(range(torch.cuda.device_count()))
    return [device.index or 0]


def describe(device: torch.device, gpus: list[int] | None = None) -> dict:
    """What the worker runs on; ``gpus`` (``worker_gpus``): memory summed over them."""
    info: dict = {"platform": platform.platform(), "torch": torch.__version__,
                  "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        gpus = gpus or worker_gpus(device)
        props = [torch.cuda.get_device_properties(i) for i in gpus]
        free, total = map(sum, zip(*(torch.cuda.mem_get_info(i) for i in gpus), strict=True))
        names = sorted({p.name for p in props})
        major, minor = min((p.major, p.minor) for p in props)
        info.update(gpu_name=" + ".join(names) + (f" x{len(gpus)}" if len(gpus) > 1 else ""),
                    gpu_count=len(gpus), gpu_memory_bytes=total, gpu_free_bytes=free,
                    bf16=torch.cuda.is_bf16_supported(), fp16=True,
                    compute_capability=f"{major}.{minor}")
    else:
        info.update(bf16=True, fp16=False)
    return info


def default_task_tokens(device: torch.device, gpus: list[int] | None = None) -> int:
    if device.type != "cuda":
        return _CPU_TASK_TOKENS
    free = sum(torch.cuda.mem_get_info(i)[0] for i in gpus or worker_gpus(device))
    return int(min(max(free * 0.7 // _BYTES_PER_TOKEN_GPU, 1024), 65536))


def precisions(device: torch.device, auto_dtype: str) -> dict:
    """The base precisions this worker can load, as declared at registration.
    bitsandbytes is looked for, not imported: importing it initialises CUDA
    libraries, which only a worker serving a quantized run needs."""
    import importlib.util

    if device.type == "cuda":
        dtypes = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
        if importlib.util.find_spec("bitsandbytes") is None:
            quant, note = [], ("bitsandbytes is not installed (pip install "
                               "'rewardsignal[quant]')")
        else:
            quant, note = ["nf4", "int8"], ""
    else:
        dtypes, quant = ["fp32", "bf16"], []
        note = f"quantized bases need a CUDA GPU (bitsandbytes); this worker runs on {device}"
    return {"auto": auto_dtype, "base_dtypes": dtypes, "quantization": quant, "note": note}


def ram_bytes() -> int:
    """The machine's physical memory."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def host_memory_bytes(device: torch.device, memory_gb: float | None) -> int:
    """Host RAM this worker offers (a merged export loads the base there at
    fp32): ``--memory-gb`` on a CPU worker, else the machine's RAM."""
    if memory_gb is not None and device.type == "cpu":
        return int(memory_gb * 2**30)
    return ram_bytes()


def offered_memory_bytes(device: torch.device, memory_gb: float | None,
                         gpus: list[int] | None = None) -> int:
    """Memory this worker offers the coordinator's placement: ``--memory-gb`` (per
    GPU of ``gpus``) when given, else the GPUs' total memory, else the machine's
    RAM."""
    if device.type == "cuda":
        gpus = gpus or worker_gpus(device)
        if memory_gb is not None:
            return int(memory_gb * 2**30) * len(gpus)
        return sum(int(torch.cuda.get_device_properties(i).total_memory) for i in gpus)
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    return ram_bytes()
