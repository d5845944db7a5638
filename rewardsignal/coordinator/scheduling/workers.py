"""What the coordinator knows of each worker: identity, declared capacity,
measured throughput, liveness and quarantine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rewardsignal.protocol import OPTIONAL_TASKS

# How long a worker may go without any request before it no longer counts as active.
ACTIVE_WINDOW_S = 60.0


@dataclass
class WorkerInfo:
    worker_id: str
    name: str
    device: str
    hardware: dict
    max_tokens_per_task: int
    models: tuple[str, ...] | None
    token_id: str = ""  # which worker token it registered with ("" when none is required)
    # What it can load (declared at registration; a worker that declares nothing
    # predates run precision and serves only runs at the default, "auto").
    base_dtypes: tuple[str, ...] | None = None
    quantization: tuple[str, ...] = ()
    quantization_note: str = ""  # why it cannot quantize, in its own words
    auto_dtype: str = ""  # what "auto" loads there; "" derives it from the device
    memory_bytes: int | None = None  # memory it offers; None: not declared
    host_memory_bytes: int | None = None  # host RAM it offers (a merge's fp32 base)
    # Check computations it can do beyond the plain ones (``protocol.CHECK_FEATURES``).
    checks: tuple[str, ...] = ()
    # Optional task kinds it runs (``protocol.OPTIONAL_TASKS``).
    tasks: tuple[str, ...] = ()
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    last_seen_wall: float = field(default_factory=time.time)
    tokens_per_s: float | None = None
    tasks_completed: int = 0
    tokens_processed: int = 0
    rejections_in_row: int = 0
    rejections_total: int = 0
    quarantined_until: float = 0.0
    quarantine_reason: str = ""
    current_task: str | None = None
    # Base models it has been given tasks on (so has loaded, as far as we know).
    bases_loaded: set[str] = field(default_factory=set)
    departed: bool = False  # said goodbye (a worker stopping cleanly)
    # run_id -> versions still pushed to it (a streamed lease) before it computes
    # a task of that run again: a worker that stopped getting a run's tasks stops
    # getting its deltas.
    push_credit: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.auto_dtype:
            self.auto_dtype = "bf16" if self.device.startswith("cuda") else "fp32"

    def touch(self) -> None:
        self.last_seen = time.monotonic()
        self.last_seen_wall = time.time()
        self.departed = False  # it is evidently still there

    @property
    def active(self) -> bool:
        return not self.departed and time.monotonic() - self.last_seen < ACTIVE_WINDOW_S

    @property
    def quarantined(self) -> bool:
        return time.monotonic() < self.quarantined_until

    def serves(self, model_id: str) -> bool:
        return self.models is None or model_id in self.models

    def to_json(self) -> dict:
        status = ("gone" if not self.active else "quarantined" if self.quarantined
                  else "busy" if self.current_task else "idle")
        return {"worker_id": self.worker_id, "name": self.name, "device": self.device,
                "hardware": self.hardware, "max_tokens_per_task": self.max_tokens_per_task,
                "tasks_completed": self.tasks_completed,
                "tokens_processed": self.tokens_processed,
                "tokens_per_s": round(self.tokens_per_s, 1) if self.tokens_per_s else None,
                "rejections": self.rejections_total, "status": status,
                "base_dtypes": list(self.base_dtypes or ["auto"]),
                "quantization": list(self.quantization), "memory_bytes": self.memory_bytes,
                "host_memory_bytes": self.host_memory_bytes, "tasks": list(self.tasks),
                "last_seen": self.last_seen_wall, "registered_at": self.registered_at}

    def capabilities(self) -> dict:
        """What it declared it can load and hold (stored, and read back by
        ``with_capabilities`` after a restart)."""
        return {"base_dtypes": list(self.base_dtypes) if self.base_dtypes is not None else None,
                "quantization": list(self.quantization),
                "quantization_note": self.quantization_note, "auto_dtype": self.auto_dtype,
                "memory_bytes": self.memory_bytes, "host_memory_bytes": self.host_memory_bytes,
                "checks": list(self.checks),
                "tasks": list(self.tasks)}

    def runs(self, kind: str) -> bool:
        """Whether it runs tasks of ``kind`` (an optional kind only when declared:
        an older worker does not know it)."""
        return kind not in OPTIONAL_TASKS or kind in self.tasks

    def with_capabilities(self, caps: dict | None) -> WorkerInfo:
        caps = caps or {}
        dtypes = caps.get("base_dtypes")
        self.base_dtypes = tuple(dtypes) if dtypes is not None else None
        self.quantization = tuple(caps.get("quantization") or ())
        self.quantization_note = caps.get("quantization_note") or ""
        self.auto_dtype = caps.get("auto_dtype") or self.auto_dtype
        self.memory_bytes = caps.get("memory_bytes")
        self.host_memory_bytes = caps.get("host_memory_bytes")
        self.checks = tuple(caps.get("checks") or ())
        self.tasks = tuple(caps.get("tasks") or ())
        return self
