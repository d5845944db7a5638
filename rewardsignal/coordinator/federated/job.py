"""A federated job: its configuration, progress and data cursor.

The job holds a dataset and runs rounds on the run (see ``rounds``); its state
is saved after every round so a restarted coordinator resumes it at its first
uncommitted round.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from rewardsignal.aggregation.combine import AGGREGATORS
from rewardsignal.aggregation.outer import OuterConfig
from rewardsignal.coordinator.store.jobs import JobStore
from rewardsignal.data.types import Datum
from rewardsignal.errors import SignalError, ValidationError


@dataclass(frozen=True)
class FederatedConfig:
    rounds: int
    local_steps: int
    batch_size: int
    inner_learning_rate: float
    outer: OuterConfig
    aggregator: str = "mean"
    trim_fraction: float = 0.2
    clip_norm: float | None = None
    tasks_per_round: int = 4
    min_updates_per_round: int = 1
    round_timeout_s: float = 600.0
    max_staleness: int = 0
    delta_norm_max: float | None = None
    codec: str = "fp32"
    inner_beta1: float = 0.9
    inner_beta2: float = 0.999
    inner_weight_decay: float = 0.0
    max_round_attempts: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ValidationError(f"aggregator must be one of {list(AGGREGATORS)}")
        if self.min_updates_per_round > self.tasks_per_round:
            raise ValidationError("min_updates_per_round cannot exceed tasks_per_round")

    def to_json(self) -> dict:
        d = asdict(self)
        d["outer"] = self.outer.to_json()
        return d


@dataclass
class FederatedJob:
    job_id: str
    run_id: str
    owner: str
    config: FederatedConfig
    train: list[Datum] = field(repr=False)
    eval: list[Datum] = field(repr=False)
    status: str = "queued"
    round: int = 0
    reason: str = ""
    history: list[dict] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    accepted: int = 0
    created_at: float = field(default_factory=time.time)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    _cursor: int = 0
    _order: list[int] = field(default_factory=list)
    _rng: random.Random | None = None

    @staticmethod
    def new_id() -> str:
        return "job-" + secrets.token_hex(6)

    def note_rejection(self, reason: str) -> None:
        self.rejected[reason] += 1
        self.touch()

    def touch(self) -> None:
        """Wake every long-poll waiting on this job's progress."""
        self.changed.set()
        self.changed = asyncio.Event()

    def next_shard(self, size: int) -> list[Datum]:
        """The next ``size`` training datums of a seeded shuffle, wrapping around."""
        if self._rng is None:
            self._rng = random.Random(self.config.seed)
        out = []
        for _ in range(min(size, len(self.train))):
            if self._cursor >= len(self._order):
                self._order = list(range(len(self.train)))
                self._rng.shuffle(self._order)
                self._cursor = 0
            out.append(self.train[self._order[self._cursor]])
            self._cursor += 1
        return out

    def state(self) -> dict:
        """What the database keeps (the datums live in a file beside it)."""
        return {"job_id": self.job_id, "run_id": self.run_id, "owner": self.owner,
                "config": self.config.to_json(), "status": self.status, "round": self.round,
                "reason": self.reason, "history": self.history, "rejected": dict(self.rejected),
                "accepted": self.accepted, "created_at": self.created_at,
                "cursor": self._cursor, "order": self._order,
                "rng": list(self._rng.getstate()[1]) if self._rng else None}

    @classmethod
    def from_state(cls, st: dict, train: list[Datum], held_out: list[Datum]) -> FederatedJob:
        cfg = dict(st["config"])
        cfg["outer"] = OuterConfig(**cfg["outer"])
        job = cls(st["job_id"], st["run_id"], st["owner"], FederatedConfig(**cfg), train,
                  held_out, status=st["status"], round=st["round"], reason=st["reason"],
                  history=st["history"], rejected=Counter(st["rejected"]),
                  accepted=st["accepted"], created_at=st["created_at"])
        job._cursor, job._order = st["cursor"], st["order"]
        if st.get("rng") is not None:
            job._rng = random.Random()
            job._rng.setstate((3, tuple(st["rng"]), None))
        return job

    def cancel(self) -> None:
        """Ask the job to stop at its next check (between rounds, or as soon as a
        round being collected notices)."""
        self.cancel_requested = True
        self.touch()

    def stamp(self) -> str:
        """Changes whenever the job's visible progress does (long-poll cursor)."""
        return f"{self.status}:{self.round}:{self.accepted}:{sum(self.rejected.values())}"

    def datums_json(self) -> dict:
        return {"train": [d.to_json() for d in self.train],
                "eval": [d.to_json() for d in self.eval]}

    def to_json(self) -> dict:
        finished = self.status in ("done", "failed", "cancelled")
        return {"job_id": self.job_id, "run_id": self.run_id, "status": self.status,
                "finished": finished, "round": self.round, "rounds": self.config.rounds,
                "version": self.history[-1]["version"] if self.history else None,
                "accepted": self.accepted, "rejected": dict(self.rejected),
                "reason": self.reason, "config": self.config.to_json(),
                "train_loss": [h["train_loss"] for h in self.history],
                "eval_loss": [h["eval_loss"] for h in self.history],
                "history": self.history, "num_train": len(self.train),
                "num_eval": len(self.eval), "created_at": self.created_at}


class RoundFailed(SignalError):
    code = "round_failed"
    http_status = 500


async def save_job(store: JobStore, job: FederatedJob) -> None:
    """Persist a job's progress (its datums are written once)."""
    await store.save(job.job_id, job.run_id, job.owner, job.state(), job.datums_json)
