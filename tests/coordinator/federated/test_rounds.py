"""Round closing without HTTP or workers: tasks are issued on a real scheduler,
their futures resolved by hand as accepted submissions would resolve them, and
the round is collected and closed into a new version."""

from __future__ import annotations

import asyncio

import pytest
import torch
from apphelpers import new_scheduler

from rewardsignal.aggregation.combine import delta_weight
from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.aggregation.outer import OuterConfig
from rewardsignal.checkpoints import CheckpointStore
from rewardsignal.coordinator.federated import rounds
from rewardsignal.coordinator.federated.job import FederatedConfig, FederatedJob
from rewardsignal.coordinator.federated.strategies import make_strategy
from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.runs.state import Run, RunSpec
from rewardsignal.coordinator.runs.versions import Versions
from rewardsignal.coordinator.store.db import Database
from rewardsignal.coordinator.store.jobs import JobStore
from rewardsignal.data.types import Datum
from rewardsignal.lora import LoraSpec

SHAPE = (2, 3)
METRICS = {"train_loss_mean": 2.0, "train_loss_last": 1.5, "grad_norm_mean": 0.3, "steps": 1.0,
           "num_samples": 2.0, "tokens": 10.0, "duration_s": 0.1}


def _datums(n: int, length: int = 4) -> list[Datum]:
    return [Datum(list(range(1, length + 1)), list(range(2, length + 2)), [1.0] * length)
            for _ in range(n)]


def _deps(tmp_path) -> rounds.RoundDeps:
    metrics = Metrics()
    scheduler = new_scheduler(default_task_tokens=1000, straggler_min_s=2, quarantine_s=10,
                              metrics=metrics)
    db = Database(tmp_path / "signal.db")
    return rounds.RoundDeps(scheduler, Versions(CheckpointStore(tmp_path / "ck"), metrics),
                            metrics, JobStore(db, tmp_path / "jobs"), float("inf"))


def _run(version: int = 0) -> Run:
    spec = RunSpec("run-t", "local", "signal-tiny", "fp", LoraSpec(target_modules=("q_proj",)),
                   AdamWConfig(), 64, 0.0)
    return Run(spec, version, {"w": torch.zeros(SHAPE)}, {}, 0, {"w": SHAPE})


def _job(aggregator: str = "mean", **kw) -> FederatedJob:
    cfg = FederatedConfig(rounds=3, local_steps=1, batch_size=2, inner_learning_rate=0.1,
                          outer=OuterConfig("fedavg", 1.0), aggregator=aggregator,
                          trim_fraction=0.0, **kw)
    return FederatedJob("job-t", "run-t", "local", cfg, _datums(8), [])


def _resolve(task, value: float, version: int | None = None) -> None:
    task.future.set_result({"delta": {"w": torch.full(SHAPE, value)},
                            "metrics": dict(METRICS), "version": version or task.version})


def test_round_closes_into_a_version_with_the_weighted_mean(tmp_path):
    async def go():
        deps, run, job = _deps(tmp_path), _run(), _job(tasks_per_round=2)
        await deps.jobs.db.open()
        rnd = rounds.Round(run.version, rounds.issue(deps, run, job), [],
                           make_strategy("mean", 0.0))
        assert [t.kind for t in rnd.own] == ["train", "train"]
        _resolve(rnd.own[0], 1.0)
        _resolve(rnd.own[1], 3.0)
        await rounds.collect(deps, run, job, rnd)
        assert rounds.carry_over(deps, run, job, rnd) == []
        entry = await rounds.close(deps, run, job, rnd)
        await deps.jobs.db.close()
        return run, entry, [t.tokens for t in rnd.own]

    run, entry, tokens = asyncio.run(go())
    assert run.version == 1 and entry["version"] == 1 and entry["accepted"] == 2
    want = (1.0 * tokens[0] + 3.0 * tokens[1]) / sum(tokens)
    torch.testing.assert_close(run.adapter["w"], torch.full(SHAPE, want))
    assert (tmp_path / "ck" / "run-t" / "v000001").is_dir()


def test_a_round_below_its_minimum_does_not_close(tmp_path):
    async def go():
        deps, run = _deps(tmp_path), _run()
        job = _job(tasks_per_round=2, min_updates_per_round=2, round_timeout_s=0.2)
        rnd = rounds.Round(run.version, rounds.issue(deps, run, job), [],
                           make_strategy("mean", 0.0))
        _resolve(rnd.own[0], 1.0)  # the other worker never answers
        await rounds.collect(deps, run, job, rnd)
        left = rounds.carry_over(deps, run, job, rnd)
        return rnd, left, deps

    rnd, left, deps = asyncio.run(go())
    assert len(rnd.metrics) == 1  # below min_updates_per_round: the caller retries the round
    assert left == [] and rnd.own[1].future.cancelled()  # max_staleness 0: nothing carried
    assert rnd.own[1].task_id not in deps.scheduler.tasks  # withdrawn from the queue


def test_late_tasks_are_carried_while_staleness_allows(tmp_path):
    async def go():
        deps, run = _deps(tmp_path), _run()
        job = _job(tasks_per_round=2, max_staleness=1, round_timeout_s=0.2)
        rnd = rounds.Round(run.version, rounds.issue(deps, run, job), [],
                           make_strategy("mean", 0.0))
        _resolve(rnd.own[0], 1.0)
        await rounds.collect(deps, run, job, rnd)
        return rounds.carry_over(deps, run, job, rnd), rnd

    carry, rnd = asyncio.run(go())
    assert carry == [rnd.own[1]] and not rnd.own[1].done


@pytest.mark.parametrize("aggregator", ["trimmed_mean", "median"])
def test_staleness_weighs_deltas_the_same_under_every_rule(tmp_path, aggregator):
    """A fresh and a stale delta, two of each under the robust rules so that
    nothing is trimmed or out-voted: every rule must weigh them by shard tokens x
    1/sqrt(1+staleness), exactly as the mean does (before, the robust rules
    scaled the stale delta itself and ignored tokens)."""
    async def combined(agg: str) -> torch.Tensor:
        deps, run = _deps(tmp_path / agg), _run(version=1)
        job = _job(agg, tasks_per_round=2, max_staleness=2)
        stale = rounds.issue(deps, _run(version=0), job)  # issued a version ago
        fresh = rounds.issue(deps, run, job)
        for t in stale:
            _resolve(t, 4.0)
        for t in fresh:
            _resolve(t, 1.0)
        rnd = rounds.Round(run.version, fresh, stale, make_strategy(agg, 0.0))
        await rounds.collect(deps, run, job, rnd)
        return rnd.strategy.combine()["w"], [t.tokens for t in stale + fresh]

    mean, tokens = asyncio.run(combined("mean"))
    other, _ = asyncio.run(combined(aggregator))
    weights = [delta_weight(t, s) for t, s in zip(tokens, (1, 1, 0, 0), strict=True)]
    want = (4.0 * (weights[0] + weights[1]) + 1.0 * (weights[2] + weights[3])) / sum(weights)
    torch.testing.assert_close(mean, torch.full(SHAPE, want))
    if aggregator == "trimmed_mean":  # trim 0: the weighted mean of all
        torch.testing.assert_close(other, mean)
    else:  # the weighted median sits with the heavier side (the fresh deltas)
        torch.testing.assert_close(other, torch.full(SHAPE, 1.0))


@pytest.mark.parametrize("aggregator", ["mean", "trimmed_mean", "median"])
def test_a_quarantined_workers_deltas_are_taken_out_of_the_round(aggregator):
    """Verification may quarantine a worker after some of its deltas were taken
    in: the round then combines exactly what it would have without them."""
    def round_of(deltas: list[tuple[str, float, float]]) -> rounds.Round:
        rnd = rounds.Round(0, [], [], make_strategy(aggregator, 0.0), hold=True)
        for worker, value, weight in deltas:
            rnd.add(worker, {"w": torch.full(SHAPE, value)}, weight, dict(METRICS))
        return rnd

    honest = [("a", 1.0, 2.0), ("b", 3.0, 1.0), ("c", 2.0, 1.0)]
    mixed = round_of([honest[0], ("evil", -40.0, 5.0), *honest[1:], ("evil", 9.0, 1.0)])
    assert mixed.purge({"evil"}) == 2
    assert mixed.purge({"evil"}) == 0
    assert [a.worker_id for a in mixed.accepted] == ["a", "b", "c"]
    assert len(mixed.metrics) == 3
    torch.testing.assert_close(mixed.strategy.combine()["w"],
                               round_of(honest).strategy.combine()["w"])
