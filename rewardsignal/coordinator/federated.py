"""Federated rounds: the coordinator holds a dataset and runs rounds itself.

Round at version v: issue ``tasks_per_round`` ``train`` tasks (a shard, K local
AdamW steps); each worker submits delta = local - v. The round closes when all
its tasks are in, or at ``round_timeout_s`` if at least ``min_updates_per_round``
were accepted; otherwise it is re-issued (at most ``max_round_attempts`` times)
and the job says why. Accepted deltas are weighted by tokens (and by
1/sqrt(1+staleness) when late tasks from an earlier round are let in), combined
by the job's rule and applied by the outer optimizer; then version and
checkpoint bump. Tasks still out when a round closes are carried into the next
round while ``max_staleness`` allows, cancelled otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from rewardsignal.aggregation.combine import (
    AGGREGATORS,
    StreamingMean,
    clip_to_norm,
    coordinate_median,
    staleness_weight,
    trimmed_mean,
)
from rewardsignal.aggregation.outer import OuterConfig, outer_step
from rewardsignal.aggregation.validate import UpdateLimits
from rewardsignal.data.types import Datum
from rewardsignal.errors import SignalError, ValidationError

log = logging.getLogger("signal.federated")


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
        self._touch()

    def _touch(self) -> None:
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


async def run_job(coord, run, job: FederatedJob) -> dict:
    """Drive ``job`` to completion on ``run`` (called from the run's ordered
    processor, so nothing else touches the run meanwhile)."""
    cfg = job.config
    job.status = "running"
    job._touch()
    await coord.save_job(job)
    carry: list = []
    try:
        if job.eval:
            loss = await _evaluate(coord, run, job)
            if loss is not None:
                coord.metrics.eval_loss.labels(run.run_id).set(loss)
            job.history.append({"round": 0, "version": run.version, "train_loss": None,
                                "eval_loss": loss, "accepted": 0, "duration_s": 0.0})
            job._touch()
        while job.round < cfg.rounds:
            if job.cancel_requested:
                raise asyncio.CancelledError
            for attempt in range(1, cfg.max_round_attempts + 1):
                outcome, carry = await _one_round(coord, run, job, carry)
                if outcome is not None:
                    break
                coord.metrics.round_failures.labels(run.run_id).inc()
                job.reason = (f"round {job.round + 1} attempt {attempt}: fewer than "
                              f"{cfg.min_updates_per_round} updates accepted within "
                              f"{cfg.round_timeout_s:g}s (rejected so far: "
                              f"{dict(job.rejected) or 'none'})")
                log.warning("round failed job=%s %s", job.job_id, job.reason)
                job._touch()
            else:
                raise RoundFailed(job.reason + f"; gave up after {cfg.max_round_attempts} "
                                  "attempts")
            job.round += 1
            job.reason = ""
            job.history.append(outcome)
            job._touch()
            await coord.save_job(job)
        job.status = "done"
    except asyncio.CancelledError:
        job.status = "cancelled"
        job.reason = job.reason or "cancelled by the user"
    except SignalError as exc:
        job.status = "failed"
        job.reason = exc.message
    finally:
        for t in carry:
            coord.scheduler.cancel(t, "job ended")
        job._touch()
    await coord.save_job(job)
    log.info("job finished job=%s status=%s rounds=%d version=%d", job.job_id, job.status,
             job.round, run.version)
    return job.to_json()


def _train_payload(job: FederatedJob, shard: list[Datum], seed: int) -> dict:
    cfg = job.config
    return {"datums": [d.to_json() for d in shard], "local_steps": cfg.local_steps,
            "batch_size": cfg.batch_size, "learning_rate": cfg.inner_learning_rate,
            "beta1": cfg.inner_beta1, "beta2": cfg.inner_beta2, "eps": 1e-8,
            "weight_decay": cfg.inner_weight_decay, "seed": seed, "codec": cfg.codec}


async def _one_round(coord, run, job: FederatedJob, carry: list) -> tuple[dict | None, list]:
    cfg = job.config
    started = time.monotonic()
    version = run.version
    limits = UpdateLimits(max_staleness=cfg.max_staleness,
                          norm_max=cfg.delta_norm_max or coord.config.delta_norm_max)
    shard_size = cfg.local_steps * cfg.batch_size
    tasks = []
    for i in range(cfg.tasks_per_round):
        shard = job.next_shard(shard_size)
        tasks.append(coord.scheduler.add_task(
            kind="train", run_id=run.run_id, base_model=run.spec.base_model, version=version,
            payload=_train_payload(job, shard, cfg.seed * 1_000_003 + job.round * 1009 + i),
            tokens=sum(len(d) for d in shard), job_id=job.job_id, limits=limits))
    own = {t.future for t in tasks}
    waiting = own | {t.future for t in carry}
    mean = StreamingMean()
    kept: list = []          # (delta, weight) for rules that need every delta
    metrics: list[dict] = []
    deadline = started + cfg.round_timeout_s
    while waiting:
        if job.cancel_requested:
            break
        if not (own & waiting) and len(metrics) >= cfg.min_updates_per_round:
            break  # every task of this round is in; late ones from before may follow later
        left = deadline - time.monotonic()
        if left <= 0:
            break
        done, waiting = await asyncio.wait(waiting, timeout=min(left, 1.0),
                                           return_when=asyncio.FIRST_COMPLETED)
        for f in done:
            if f.cancelled() or f.exception() is not None:
                continue
            res = f.result()
            staleness = run.version - res["version"]
            weight = res["metrics"]["tokens"] * staleness_weight(staleness)
            delta = res.pop("delta")  # the task's future must not keep it alive
            if cfg.clip_norm is not None:
                delta = await asyncio.to_thread(clip_to_norm, delta, cfg.clip_norm)
            if cfg.aggregator == "mean":
                await asyncio.to_thread(mean.add, delta, weight)
            else:
                scale = staleness_weight(staleness)
                kept.append({k: v * scale for k, v in delta.items()} if scale != 1 else delta)
            metrics.append({**res["metrics"], "staleness": staleness})
            job.accepted += 1
            job._touch()
    all_tasks = tasks + carry
    outstanding = [t for t in all_tasks if not t.done]
    keep_going = cfg.max_staleness > 0 and not job.cancel_requested
    next_carry = [t for t in outstanding if keep_going and run.version + 1 - t.version
                  <= cfg.max_staleness]
    for t in outstanding:
        if t not in next_carry:
            coord.scheduler.cancel(t, "round closed")
    if job.cancel_requested:
        raise asyncio.CancelledError
    if len(metrics) < cfg.min_updates_per_round:
        return None, next_carry
    if cfg.aggregator == "mean":
        combined = mean.value()
    elif cfg.aggregator == "trimmed_mean":
        combined = await asyncio.to_thread(trimmed_mean, kept, cfg.trim_fraction)
    else:
        combined = await asyncio.to_thread(coordinate_median, kept)
    params, outer_state = await asyncio.to_thread(outer_step, run.adapter, combined,
                                                  run.opt_state, cfg.outer)
    train_loss = sum(m["train_loss_mean"] * m["tokens"] for m in metrics) / max(
        sum(m["tokens"] for m in metrics), 1)
    entry = {"round": job.round + 1, "version": run.version + 1, "train_loss": train_loss,
             "accepted": len(metrics), "rejected": dict(job.rejected),
             "tokens": sum(m["tokens"] for m in metrics),
             "train_loss_last": sum(m["train_loss_last"] for m in metrics) / len(metrics)}
    await coord.commit_version(run, params, {**run.opt_state, **outer_state},
                               history_entry={"version": run.version + 1, "loss": train_loss,
                                              "tokens": entry["tokens"], "time": time.time(),
                                              "job_id": job.job_id, "round": job.round + 1})
    entry["eval_loss"] = await _evaluate(coord, run, job) if job.eval else None
    entry["duration_s"] = time.monotonic() - started
    coord.metrics.rounds.labels(run.run_id).inc()
    coord.metrics.round_duration.labels(run.run_id).observe(entry["duration_s"])
    if entry["eval_loss"] is not None:
        coord.metrics.eval_loss.labels(run.run_id).set(entry["eval_loss"])
    log.info("round closed job=%s round=%d version=%d accepted=%d train_loss=%.4f eval_loss=%s",
             job.job_id, entry["round"], run.version, len(metrics), train_loss,
             f"{entry['eval_loss']:.4f}" if entry["eval_loss"] is not None else "-")
    return entry, next_carry


async def _evaluate(coord, run, job: FederatedJob) -> float | None:
    """Mean token loss of the held-out set at the run's current version, on workers."""
    task = coord.scheduler.add_task(
        kind="forward", run_id=run.run_id, base_model=run.spec.base_model, version=run.version,
        payload={"datums": [d.to_json() for d in job.eval], "loss_fn": "cross_entropy",
                 "loss_fn_config": {}}, tokens=sum(len(d) for d in job.eval))
    try:
        res = await asyncio.wait_for(asyncio.shield(task.future), job.config.round_timeout_s)
    except (TimeoutError, SignalError):
        coord.scheduler.cancel(task, "evaluation timed out")
        return None
    return res["loss_sum"] / res["weight_sum"] if res["weight_sum"] else None

