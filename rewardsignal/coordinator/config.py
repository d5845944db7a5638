"""The coordinator's configuration: one frozen dataclass, built by the CLI from
flags with environment-variable fallbacks, passed explicitly to ``make_app``."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from rewardsignal.coordinator.catalog import ModelCatalog
from rewardsignal.errors import ValidationError


@dataclass(frozen=True)
class CoordinatorConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    worker_tokens: tuple[str, ...] = ()
    max_staleness: int = 0                 # MAX_STALENESS: sync gradients must be fresh
    delta_norm_max: float = math.inf       # DELTA_NORM_MAX: per unit of loss weight
    tick_interval_s: float = 1.0           # TICK_INTERVAL_SEC
    lease_timeout_s: float = 30.0          # a lease dies this long after the last heartbeat
    max_task_attempts: int = 3             # leases a task may expire/fail before its request fails
    request_timeout_s: float = 600.0       # default per-request bound when the caller sets none
    max_body_bytes: int = 512 << 20
    upload_slots: int = 2                  # submission bodies taken in at once (memory bound)
    keep_last_checkpoints: int = 5
    checkpoint_interval_s: float = 1.0     # a run's background checkpoints: at most one per
                                           # this many seconds (0: one per version)
    default_task_tokens: int = 8192        # shard size while no worker has said otherwise
    straggler_factor: float = 3.0          # re-issue a lease running this many times its estimate
    straggler_min_s: float = 2.0
    quarantine_after: int = 5              # rejected submissions in a row before quarantine
    quarantine_s: float = 300.0
    checkpoint_dir: Path | None = None     # CHECKPOINT_DIR; default <data_dir>/checkpoints
    num_tasks_per_round: int = 4           # NUM_TASKS_PER_ROUND (federated jobs' default)
    min_updates_per_round: int = 1         # MIN_UPDATES_PER_ROUND
    round_timeout_s: float = 600.0         # ROUND_TIMEOUT_SEC
    keep_finished_requests: int = 10_000   # finished requests kept for late clients
    no_worker_grace_s: float = 60.0        # a request no live worker can take fails after this
    worker_retention_s: float = 600.0      # gone workers are forgotten after this
    models: ModelCatalog | None = None     # --models FILE: the only base models served
    log_to: tuple[str, ...] = ()           # --log-to: tracking for runs that name none
    wandb_project: str | None = None       # --wandb-project (WANDB_PROJECT)
    verify_fraction: float = 0.05          # VERIFY_FRACTION: trusted workers' results checked
    probation_tasks: int = 5               # PROBATION_TASKS: a new worker's results all checked
    verify_train_fraction: float = 0.05    # VERIFY_TRAIN_FRACTION: trusted federated deltas checked
    verify_memory_mb: int = 1024           # VERIFY_MEMORY_MB: gradients held for their checks

    def __post_init__(self) -> None:
        checks = [
            (self.port >= 0 and self.port < 65536, f"port must be in [0, 65535], got {self.port}"),
            (self.max_staleness >= 0, "max_staleness must be >= 0"),
            (self.delta_norm_max > 0, "delta_norm_max must be > 0"),
            (self.tick_interval_s > 0, "tick_interval_s must be > 0"),
            (self.lease_timeout_s > 0, "lease_timeout_s must be > 0"),
            (self.max_task_attempts >= 1, "max_task_attempts must be >= 1"),
            (self.request_timeout_s > 0, "request_timeout_s must be > 0"),
            (self.max_body_bytes >= 1024, "max_body_bytes must be >= 1024"),
            (1 <= self.upload_slots <= 64, "upload_slots must be in [1, 64]"),
            (self.keep_last_checkpoints >= 1, "keep_last_checkpoints must be >= 1"),
            (self.checkpoint_interval_s >= 0, "checkpoint_interval_s must be >= 0"),
            (self.default_task_tokens >= 1, "default_task_tokens must be >= 1"),
            (self.num_tasks_per_round >= 1, "num_tasks_per_round must be >= 1"),
            (1 <= self.min_updates_per_round <= self.num_tasks_per_round,
             "min_updates_per_round must be in [1, num_tasks_per_round]"),
            (self.round_timeout_s > 0, "round_timeout_s must be > 0"),
            (self.keep_finished_requests >= 1, "keep_finished_requests must be >= 1"),
            (self.no_worker_grace_s > 0, "no_worker_grace_s must be > 0"),
            (self.worker_retention_s > 0, "worker_retention_s must be > 0"),
            (0 <= self.verify_fraction <= 1, "verify_fraction must be in [0, 1]"),
            (self.probation_tasks >= 0, "probation_tasks must be >= 0"),
            (0 <= self.verify_train_fraction <= 1, "verify_train_fraction must be in [0, 1]"),
            (self.verify_memory_mb >= 0, "verify_memory_mb must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValidationError(msg)

    @property
    def checkpoints_root(self) -> Path:
        return Path(self.checkpoint_dir or Path(self.data_dir) / "checkpoints")

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check_exposure(self, *, stored_user_keys: bool = False,
                       stored_worker_keys: bool = False) -> None:
        """Refuse to serve a non-loopback address without keys: anyone could
        then create runs or submit gradients. Keys made with ``signal keys
        create`` count."""
        if self.is_loopback:
            return
        missing = [name for name, v in (
            ("--api-key", self.api_keys or stored_user_keys),
            ("--worker-token", self.worker_tokens or stored_worker_keys)) if not v]
        if missing:
            raise ValidationError(
                f"refusing to listen on {self.host} without {' and '.join(missing)}: anyone who "
                "can reach the port could train or submit updates. Pass keys (or "
                "SIGNAL_API_KEYS / SIGNAL_WORKER_TOKENS), or bind 127.0.0.1.")
        if self.models is None:
            raise ValidationError(
                f"refusing to listen on {self.host} without --models FILE: any user could make "
                "the coordinator download and hash any model. List the base models it serves "
                "(YAML: models: [{name: org/model}, ...]; see docs/operations.md), or bind "
                "127.0.0.1.")

    def to_json(self) -> dict:
        d = asdict(self)
        d["data_dir"] = str(self.data_dir)
        d["checkpoint_dir"] = str(self.checkpoints_root)
        d["api_keys"] = len(self.api_keys)
        d["worker_tokens"] = len(self.worker_tokens)
        d["delta_norm_max"] = None if math.isinf(self.delta_norm_max) else self.delta_norm_max
        d["models"] = self.models.path if self.models is not None else None
        return d
