"""Federated rounds: the coordinator holds a dataset and runs rounds itself.

Round at version v: ``issue`` ``tasks_per_round`` ``train`` tasks (a shard, K
local AdamW steps); each worker submits delta = local - v. ``collect`` closes
when all the round's tasks are in, or at ``round_timeout_s`` if at least
``min_updates_per_round`` were accepted; otherwise the round is re-issued (at
most ``max_round_attempts`` times) and the job says why. Every accepted delta
is weighted by ``delta_weight`` (its shard's tokens x 1/sqrt(1+staleness) when
late tasks from an earlier round are let in), whatever the rule; ``close``
combines them with the job's strategy, applies the outer optimizer, and bumps
version and checkpoint. Tasks still out when a round closes are carried into
the next round while ``max_staleness`` allows, cancelled otherwise.

Verification (``coordinator.trust``): a delta drawn for a check counts once a
second worker's run of the same task (same shard, seed and K) agrees with it
within the train bound; a disagreement goes to a third worker, and the one in
the minority is quarantined. A round holds its accepted deltas while it is
collected when verification is on, so that a worker quarantined before the
round closes has every delta of it in the round taken out (and the round is
collected again below its minimum). The robust rules stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from rewardsignal.aggregation.combine import clip_to_norm, delta_weight
from rewardsignal.aggregation.outer import outer_step
from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.aggregation.validate import UpdateLimits
from rewardsignal.coordinator.federated.job import FederatedJob, RoundFailed, save_job
from rewardsignal.coordinator.federated.strategies import Strategy, make_strategy
from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.runs.versions import Versions
from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.scheduling.tasks import Task
from rewardsignal.coordinator.store.jobs import JobStore
from rewardsignal.coordinator.tracking import Trackers
from rewardsignal.coordinator.trust.verify import Outcome, Verifier
from rewardsignal.data.types import Datum
from rewardsignal.errors import SignalError

log = logging.getLogger("signal.federated")


@dataclass
class RoundDeps:
    """What rounds use of the coordinator."""

    scheduler: Scheduler
    versions: Versions
    metrics: Metrics
    jobs: JobStore
    delta_norm_max: float  # the coordinator's default when the job sets none
    trackers: Trackers | None = None  # experiment tracking (TensorBoard / W&B)
    verifier: Verifier | None = None  # checks of train deltas by recomputation


@dataclass
class Accepted:
    """One delta counted in a round: whose, its weight and metrics (the delta
    itself only while verification may still take it out)."""

    worker_id: str
    weight: float
    metrics: dict
    delta: Tensors | None = field(default=None, repr=False)


@dataclass
class Round:
    """One round being collected."""

    version: int
    own: list[Task]
    carry: list[Task]
    strategy: Strategy
    started: float = field(default_factory=time.monotonic)
    accepted: list[Accepted] = field(default_factory=list)
    hold: bool = False  # keep each delta until the round closes (verification is on)

    @property
    def all_tasks(self) -> list[Task]:
        return self.own + self.carry

    @property
    def metrics(self) -> list[dict]:
        return [a.metrics for a in self.accepted]

    def add(self, worker_id: str, delta: Tensors, weight: float, metrics: dict) -> None:
        self.strategy.add(delta, weight)
        self.accepted.append(Accepted(worker_id, weight, metrics, delta if self.hold else None))

    def purge(self, bad: set[str]) -> int:
        """Take out every delta of the workers in ``bad`` (quarantined while the
        round was collected): the strategy is rebuilt from the others."""
        out = [a for a in self.accepted if a.worker_id in bad]
        if not out:
            return 0
        self.accepted = [a for a in self.accepted if a.worker_id not in bad]
        self.strategy = self.strategy.empty()
        for a in self.accepted:
            assert a.delta is not None, "deltas are held whenever a worker can be quarantined"
            self.strategy.add(a.delta, a.weight)
        return len(out)


async def run_job(deps: RoundDeps, run: Run, job: FederatedJob) -> dict:
    """Drive ``job`` to completion on ``run`` (called from the run's ordered
    processor, so nothing else touches the run meanwhile)."""
    job.status = "running"
    job.touch()
    await save_job(deps.jobs, job)
    carry: list[Task] = []
    try:
        if job.eval:
            await _initial_eval(deps, run, job)
        while job.round < job.config.rounds:
            if job.cancel_requested:
                raise asyncio.CancelledError
            outcome, carry = await _round_with_retries(deps, run, job, carry)
            job.round += 1
            job.reason = ""
            job.history.append(outcome)
            job.touch()
            await save_job(deps.jobs, job)
        job.status = "done"
    except asyncio.CancelledError:
        job.status = "cancelled"
        job.reason = job.reason or "cancelled by the user"
    except SignalError as exc:
        job.status = "failed"
        job.reason = exc.message
    finally:
        for t in carry:
            deps.scheduler.cancel(t, "job ended")
        job.touch()
    await save_job(deps.jobs, job)
    log.info("job finished job=%s status=%s rounds=%d version=%d", job.job_id, job.status,
             job.round, run.version)
    return job.to_json()


async def _initial_eval(deps: RoundDeps, run: Run, job: FederatedJob) -> None:
    loss = await evaluate(deps, run, job)
    if loss is not None:
        deps.metrics.eval_loss.labels(run.run_id).set(loss)
    job.history.append({"round": 0, "version": run.version, "train_loss": None,
                        "eval_loss": loss, "accepted": 0, "duration_s": 0.0})
    job.touch()


async def _round_with_retries(deps: RoundDeps, run: Run, job: FederatedJob, carry: list[Task]
                              ) -> tuple[dict, list[Task]]:
    cfg = job.config
    checked = deps.verifier is not None and deps.verifier.trust.enabled
    for attempt in range(1, cfg.max_round_attempts + 1):
        rnd = Round(run.version, issue(deps, run, job), carry,
                    make_strategy(cfg.aggregator, cfg.trim_fraction), hold=checked)
        await collect(deps, run, job, rnd)
        carry = carry_over(deps, run, job, rnd)
        if checked:
            _purge_quarantined(deps, job, rnd)
        if job.cancel_requested:
            raise asyncio.CancelledError
        if len(rnd.metrics) >= cfg.min_updates_per_round:
            return await close(deps, run, job, rnd), carry
        deps.metrics.round_failures.labels(run.run_id).inc()
        job.reason = (f"round {job.round + 1} attempt {attempt}: fewer than "
                      f"{cfg.min_updates_per_round} updates accepted within "
                      f"{cfg.round_timeout_s:g}s (rejected so far: "
                      f"{dict(job.rejected) or 'none'})")
        log.warning("round failed job=%s %s", job.job_id, job.reason)
        job.touch()
    raise RoundFailed(job.reason + f"; gave up after {cfg.max_round_attempts} attempts")


def _train_payload(job: FederatedJob, shard: list[Datum], seed: int) -> dict:
    cfg = job.config
    return {"datums": [d.to_json() for d in shard], "local_steps": cfg.local_steps,
            "batch_size": cfg.batch_size, "learning_rate": cfg.inner_learning_rate,
            "beta1": cfg.inner_beta1, "beta2": cfg.inner_beta2, "eps": 1e-8,
            "weight_decay": cfg.inner_weight_decay, "seed": seed, "codec": cfg.codec}


def issue(deps: RoundDeps, run: Run, job: FederatedJob) -> list[Task]:
    """The round's ``train`` tasks at the run's current version."""
    cfg = job.config
    limits = UpdateLimits(max_staleness=cfg.max_staleness,
                          norm_max=cfg.delta_norm_max or deps.delta_norm_max)
    shard_size = cfg.local_steps * cfg.batch_size
    tasks = []
    for i in range(cfg.tasks_per_round):
        shard = job.next_shard(shard_size)
        tasks.append(deps.scheduler.add_task(
            kind="train", run_id=run.run_id, base_model=run.spec.base_model,
            version=run.version,
            payload=_train_payload(job, shard, cfg.seed * 1_000_003 + job.round * 1009 + i),
            tokens=sum(len(d) for d in shard), job_id=job.job_id, limits=limits))
    if deps.verifier is not None:
        for t in tasks:
            t.checkable = deps.verifier.trust.checkable(run, t.kind)
    return tasks


async def collect(deps: RoundDeps, run: Run, job: FederatedJob, rnd: Round) -> None:
    """Take in accepted deltas until every task of this round is in (and at least
    the minimum was accepted, every check of them decided), the round times
    out (then the checks under way are still decided), or the job is cancelled."""
    cfg = job.config
    task_of: dict[asyncio.Future, Task] = {t.future: t for t in rnd.all_tasks}
    own = {t.future for t in rnd.own}
    checks: dict[asyncio.Future, Task] = {}
    waiting: set[asyncio.Future] = set(task_of)
    deadline = rnd.started + cfg.round_timeout_s
    try:
        while waiting and not job.cancel_requested:
            if (not ((own | set(checks)) & waiting)
                    and len(rnd.accepted) >= cfg.min_updates_per_round):
                break  # every task of this round is in; late ones from before may follow later
            left = deadline - time.monotonic()
            if left <= 0:
                if not checks:
                    break
                # Past the deadline only the verdicts on deltas in hand are awaited
                # (each is bounded: a check gives up once no checker is live).
                waiting, left = set(checks), 1.0
            done, waiting = await asyncio.wait(waiting, timeout=min(left, 1.0),
                                               return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                if f.cancelled() or f.exception() is not None:
                    if checks.pop(f, None) is not None:
                        job.note_rejection("unverified")
                    continue
                if f in checks:
                    task, outcome = checks.pop(f), f.result()
                    if outcome is None:  # no majority: the delta does not count
                        job.note_rejection("unverified")
                    else:
                        await _accept(run, job, rnd, task, outcome)
                    continue
                task = task_of[f]
                res = f.result()
                first = Outcome(task.done_by, res, res.pop("delta"))
                if task.check and deps.verifier is not None:
                    check = asyncio.ensure_future(deps.verifier.check(run, task, first))
                    checks[check] = task
                    waiting.add(check)
                else:
                    await _accept(run, job, rnd, task, first)
    finally:
        for f in checks:  # undecided when the round ended: those deltas do not count
            f.cancel()
            job.note_rejection("unverified")


async def _accept(run: Run, job: FederatedJob, rnd: Round, task: Task, got: Outcome) -> None:
    res = got.result
    staleness = run.version - res["version"]
    delta = got.tensors
    got.tensors = None  # the task's future must not keep it alive
    assert delta is not None
    if job.config.clip_norm is not None:
        delta = await asyncio.to_thread(clip_to_norm, delta, job.config.clip_norm)
    await asyncio.to_thread(rnd.add, got.worker_id, delta, delta_weight(task.tokens, staleness),
                            {**res["metrics"], "staleness": staleness})
    job.accepted += 1
    job.touch()


def _purge_quarantined(deps: RoundDeps, job: FederatedJob, rnd: Round) -> None:
    """Take out of ``rnd`` the deltas of workers quarantined while it was collected."""
    assert deps.verifier is not None
    trust = deps.verifier.trust
    bad = {a.worker_id for a in rnd.accepted if trust.is_quarantined(a.worker_id)}
    removed = rnd.purge(bad)
    if removed:
        job.accepted -= removed
        for _ in range(removed):
            job.note_rejection("quarantined")
        log.warning("round %d of job %s: %d delta(s) of quarantined worker(s) taken out",
                    job.round + 1, job.job_id, removed)


def carry_over(deps: RoundDeps, run: Run, job: FederatedJob, rnd: Round) -> list[Task]:
    """Tasks still out that the next round may still take (within
    ``max_staleness``); the rest are cancelled."""
    cfg = job.config
    outstanding = [t for t in rnd.all_tasks if not t.done]
    keep_going = cfg.max_staleness > 0 and not job.cancel_requested
    carry = [t for t in outstanding
             if keep_going and run.version + 1 - t.version <= cfg.max_staleness]
    for t in outstanding:
        if t not in carry:
            deps.scheduler.cancel(t, "round closed")
    return carry


async def close(deps: RoundDeps, run: Run, job: FederatedJob, rnd: Round) -> dict:
    """Combine, step, commit the new version, evaluate; the round's history entry."""
    combined = await asyncio.to_thread(rnd.strategy.combine)
    params, outer_state = await asyncio.to_thread(outer_step, run.adapter, combined,
                                                  run.opt_state, job.config.outer)
    ms = rnd.metrics
    tokens = sum(m["tokens"] for m in ms)
    train_loss = sum(m["train_loss_mean"] * m["tokens"] for m in ms) / max(tokens, 1)
    entry = {"round": job.round + 1, "version": run.version + 1, "train_loss": train_loss,
             "accepted": len(ms), "rejected": dict(job.rejected), "tokens": tokens,
             "train_loss_last": sum(m["train_loss_last"] for m in ms) / len(ms)}
    await deps.versions.commit(run, params, {**run.opt_state, **outer_state},
                               history_entry={"version": run.version + 1, "loss": train_loss,
                                              "tokens": tokens, "time": time.time(),
                                              "job_id": job.job_id, "round": job.round + 1})
    entry["eval_loss"] = await evaluate(deps, run, job) if job.eval else None
    entry["duration_s"] = time.monotonic() - rnd.started
    norms = [m["grad_norm_mean"] for m in ms if m.get("grad_norm_mean") is not None]
    _observe(deps.metrics, run, job, entry)
    if deps.trackers is not None:
        deps.trackers.log(run.run_id, run.version, {
            "round/train_loss": entry["train_loss"], "round/eval_loss": entry["eval_loss"],
            "round/tokens": tokens, "round/accepted": entry["accepted"],
            "round/rejected": sum(job.rejected.values()),
            "round/grad_norm": sum(norms) / len(norms) if norms else None,
            **{f"round/rejected/{k}": v for k, v in job.rejected.items()}})
    return entry


def _observe(metrics: Metrics, run: Run, job: FederatedJob, entry: dict) -> None:
    metrics.rounds.labels(run.run_id).inc()
    metrics.round_duration.labels(run.run_id).observe(entry["duration_s"])
    # A federated run's train loss is its rounds' (token-weighted) local loss.
    metrics.train_loss.labels(run.run_id).set(entry["train_loss"])
    metrics.tokens.labels(run.run_id).inc(entry["tokens"])
    if entry["eval_loss"] is not None:
        metrics.eval_loss.labels(run.run_id).set(entry["eval_loss"])
    log.info("round closed job=%s round=%d version=%d accepted=%d train_loss=%.4f eval_loss=%s",
             job.job_id, entry["round"], run.version, entry["accepted"], entry["train_loss"],
             f"{entry['eval_loss']:.4f}" if entry["eval_loss"] is not None else "-")


async def evaluate(deps: RoundDeps, run: Run, job: FederatedJob) -> float | None:
    """Mean token loss of the held-out set at the run's current version, on workers."""
    task = deps.scheduler.add_task(
        kind="forward", run_id=run.run_id, base_model=run.spec.base_model, version=run.version,
        payload={"datums": [d.to_json() for d in job.eval], "loss_fn": "cross_entropy",
                 "loss_fn_config": {}}, tokens=sum(len(d) for d in job.eval))
    try:
        res = await asyncio.wait_for(asyncio.shield(task.future), job.config.round_timeout_s)
    except (TimeoutError, SignalError):
        deps.scheduler.cancel(task, "evaluation timed out")
        return None
    return res["loss_sum"] / res["weight_sum"] if res["weight_sum"] else None
