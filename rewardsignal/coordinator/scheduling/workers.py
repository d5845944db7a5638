"""What the coordinator knows of each worker: identity, declared capacity,
measured throughput, liveness and quarantine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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
    departed: bool = False  # said goodbye (a worker stopping cleanly)

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
                "last_seen": self.last_seen_wall, "registered_at": self.registered_at}
