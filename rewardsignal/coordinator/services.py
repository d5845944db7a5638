"""The coordinator's parts, typed and wired once (``Coordinator`` builds them):
what operations, recovery and the HTTP front ends are handed."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewardsignal.aggregation.validate import UpdateLimits
from rewardsignal.checkpoints import CheckpointStore
from rewardsignal.coordinator.config import CoordinatorConfig
from rewardsignal.coordinator.federated.job import FederatedJob
from rewardsignal.coordinator.federated.rounds import RoundDeps
from rewardsignal.coordinator.ingest.accept import Ingest
from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.runs.requests import RequestRegistry
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.runs.versions import Versions
from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.scheduling.slots import UploadSlots
from rewardsignal.coordinator.store.artifacts import ArtifactStore
from rewardsignal.coordinator.store.datasets import DatasetStore
from rewardsignal.coordinator.store.db import Database
from rewardsignal.coordinator.store.jobs import JobStore
from rewardsignal.coordinator.store.pending import PendingGradients
from rewardsignal.coordinator.tracking import Trackers
from rewardsignal.coordinator.trust.service import Trust
from rewardsignal.coordinator.trust.verify import Verifier
from rewardsignal.data.examples import examples_to_datums
from rewardsignal.data.types import Datum


class Tokenizers:
    """One tokenizer per base model, loaded on first use (blocking: call from a
    thread; the lock keeps two threads from loading the same one twice)."""

    def __init__(self) -> None:
        self._by_model: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, model_id: str) -> Any:
        with self._lock:
            if model_id not in self._by_model:
                from rewardsignal.models import load_tokenizer

                self._by_model[model_id] = load_tokenizer(model_id)
            return self._by_model[model_id]

    def datums(self, run: Run, batch: list, name: str = "batch") -> list[Datum]:
        """Examples -> token ids + loss weights with the run's tokenizer (blocking)."""
        return examples_to_datums(batch, self.get(run.spec.base_model),
                                  max_length=run.spec.max_length, name=name)


@dataclass
class Services:
    config: CoordinatorConfig
    metrics: Metrics
    db: Database
    scheduler: Scheduler
    versions: Versions
    pending: PendingGradients
    artifacts: ArtifactStore
    datasets: DatasetStore
    job_store: JobStore
    upload_slots: UploadSlots
    requests: RequestRegistry
    trust: Trust
    tokenizers: Tokenizers = field(default_factory=Tokenizers)
    trackers: Trackers = field(default_factory=Trackers)
    runs: dict[str, Run] = field(default_factory=dict)
    jobs: dict[str, FederatedJob] = field(default_factory=dict)
    rejections: Counter = field(default_factory=Counter)

    @classmethod
    def build(cls, config: CoordinatorConfig, metrics: Metrics) -> Services:
        root = Path(config.data_dir)
        db = Database(root / "signal.db", keep_finished=config.keep_finished_requests)
        store = CheckpointStore(config.checkpoints_root, keep_last=config.keep_last_checkpoints)
        scheduler = Scheduler(
            lease_timeout_s=config.lease_timeout_s, max_attempts=config.max_task_attempts,
            default_task_tokens=config.default_task_tokens,
            straggler_factor=config.straggler_factor, straggler_min_s=config.straggler_min_s,
            quarantine_after=config.quarantine_after, quarantine_s=config.quarantine_s,
            metrics=metrics, hold_limit_bytes=config.verify_memory_mb << 20)
        runs: dict[str, Run] = {}
        trust = Trust(verify_fraction=config.verify_fraction,
                      probation_tasks=config.probation_tasks,
                      train_fraction=config.verify_train_fraction, db=db, scheduler=scheduler,
                      metrics=metrics, runs=runs, live_window_s=config.lease_timeout_s)
        return cls(config=config, metrics=metrics, db=db, scheduler=scheduler, runs=runs,
                   trust=trust,
                   versions=Versions(store, metrics, config.checkpoint_interval_s),
                   pending=PendingGradients(db, root / "pending"),
                   artifacts=ArtifactStore(root / "artifacts", store),
                   datasets=DatasetStore(root / "datasets"),
                   job_store=JobStore(db, root / "jobs"),
                   upload_slots=UploadSlots(config.upload_slots),
                   requests=RequestRegistry(config.keep_finished_requests))

    @property
    def limits(self) -> UpdateLimits:
        return UpdateLimits(self.config.max_staleness, self.config.delta_norm_max)

    def ingest(self) -> Ingest:
        return Ingest(self.scheduler, self.runs, self.jobs, self.metrics, self.limits,
                      self.rejections, self.trust)

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.trust, self.scheduler)

    def round_deps(self) -> RoundDeps:
        return RoundDeps(self.scheduler, self.versions, self.metrics, self.job_store,
                         self.config.delta_norm_max, self.trackers, self.verifier)
