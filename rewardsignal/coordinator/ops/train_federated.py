"""``train_federated``: a job of federated rounds over a dataset the coordinator
holds. The job is created and saved when the request is accepted (its id comes
back with the 202); it runs as one barrier on the run and bounds itself (rounds
x round timeout, attempts), so the request timeout does not apply."""

from __future__ import annotations

import asyncio
import logging

from rewardsignal.aggregation.codecs import CODECS
from rewardsignal.aggregation.combine import AGGREGATORS
from rewardsignal.aggregation.outer import DEFAULT_OUTER_LR, OUTER_OPTIMIZERS, OuterConfig
from rewardsignal.coordinator.config import CoordinatorConfig
from rewardsignal.coordinator.federated.job import FederatedConfig, FederatedJob, save_job
from rewardsignal.coordinator.federated.rounds import run_job
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.ops.forward import MAX_BATCH
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services
from rewardsignal.data.examples import example_to_datum
from rewardsignal.data.types import Datum
from rewardsignal.errors import ValidationError

log = logging.getLogger("signal.coordinator")


async def _examples(ctx: Services, body: Body, owner: str, id_key: str, list_key: str,
                    required: bool, name: str) -> tuple[list, list[str]] | None:
    """The examples and where each came from: ``file line N`` (1-based) for an
    uploaded dataset, ``name[i]`` for a list in the body."""
    dataset_id = body.str(id_key, None, max_len=64)
    examples = body.list(list_key, None, max_len=MAX_BATCH * 16)
    if dataset_id is not None and examples is not None:
        raise ValidationError(f"give {id_key!r} or {list_key!r}, not both")
    if dataset_id is not None:
        meta, numbered = await asyncio.to_thread(ctx.datasets.load_lines, owner, dataset_id)
        return ([obj for _, obj in numbered],
                [f"{meta.get('name') or dataset_id} line {n}" for n, _ in numbered])
    if examples is None:
        if required:
            raise ValidationError(f"missing field {id_key!r} (upload with POST /v1/datasets) "
                                  f"or {list_key!r}")
        return None
    if not examples:
        raise ValidationError(f"{name} must be a non-empty list of examples")
    return examples, [f"{name}[{i}]" for i in range(len(examples))]


def _datums(ctx: Services, run: Run, found: tuple[list, list[str]]) -> list[Datum]:
    """Blocking (tokenises): call through a thread."""
    tok = ctx.tokenizers.get(run.spec.base_model)
    return [example_to_datum(ex, tok, max_length=run.spec.max_length, where=where)
            for ex, where in zip(*found, strict=True)]


def _config(body: Body, cfg: CoordinatorConfig, run: Run) -> FederatedConfig:
    outer_name = body.str("outer_optimizer", "fedavg", choices=OUTER_OPTIMIZERS)
    tasks_per_round = body.int("tasks_per_round", cfg.num_tasks_per_round, lo=1, hi=4096)
    return FederatedConfig(
        rounds=body.int("rounds", lo=1, hi=1_000_000),
        local_steps=body.int("local_steps", 8, lo=1, hi=100_000),
        batch_size=body.int("batch_size", 8, lo=1, hi=65_536),
        inner_learning_rate=body.float("inner_learning_rate", run.spec.optimizer.learning_rate,
                                       lo=0, lo_open=True, hi=10),
        outer=OuterConfig(outer_name,
                          body.float("outer_learning_rate", DEFAULT_OUTER_LR[outer_name], lo=0,
                                     lo_open=True, hi=10),
                          momentum=body.float("outer_momentum", 0.9, lo=0, hi=0.999)),
        aggregator=body.str("aggregator", "mean", choices=AGGREGATORS),
        trim_fraction=body.float("trim_fraction", 0.2, lo=0, hi=0.49),
        clip_norm=body.float("clip_norm", None, lo=0, lo_open=True),
        tasks_per_round=tasks_per_round,
        min_updates_per_round=body.int("min_updates_per_round",
                                       min(cfg.min_updates_per_round, tasks_per_round), lo=1,
                                       hi=tasks_per_round),
        round_timeout_s=body.float("round_timeout_s", cfg.round_timeout_s, lo=0, lo_open=True,
                                   hi=7 * 86400),
        max_staleness=body.int("max_staleness", 0, lo=0, hi=1000),
        delta_norm_max=body.float("delta_norm_max", None, lo=0, lo_open=True),
        codec=body.str("codec", "fp32", choices=CODECS),
        seed=body.int("seed", 0, lo=0, hi=2**63 - 1))


class TrainFederated(Operation):
    name = "train_federated"
    barrier = True
    bounded = False

    async def parse(self, ctx: Services, run: Run, owner: str, body: Body) -> FederatedJob:
        train = await _examples(ctx, body, owner, "dataset_id", "examples", True, "dataset")
        held_out = await _examples(ctx, body, owner, "eval_dataset_id", "eval_examples", False,
                                   "eval_dataset")
        fed = _config(body, ctx.config, run)
        assert train is not None
        train_datums = await asyncio.to_thread(_datums, ctx, run, train)
        eval_datums = (await asyncio.to_thread(_datums, ctx, run, held_out)
                       if held_out is not None else [])
        return FederatedJob(FederatedJob.new_id(), run.run_id, owner, fed, train_datums,
                            eval_datums)

    async def accept(self, ctx: Services, run: Run, owner: str, job: FederatedJob) -> dict:
        ctx.jobs[job.job_id] = job
        await save_job(ctx.job_store, job)
        return {"job_id": job.job_id}

    def dump(self, job: FederatedJob) -> dict:
        return {"job_id": job.job_id}

    async def execute(self, ctx: Services, run: Run, request: Request,
                      args: FederatedJob | dict) -> dict:
        # The job itself when just accepted; its id when re-queued after a restart.
        job = ctx.jobs[args.job_id if isinstance(args, FederatedJob) else args["job_id"]]
        if job.cancel_requested:
            job.status = "cancelled"
            job.reason = "cancelled before it started"
            return job.to_json()
        if not run.accum.empty:
            log.warning("run %s: a federated job starts with un-stepped gradients; they "
                        "are kept for the next optim_step", run.run_id)
        return await run_job(ctx.round_deps(), run, job)
