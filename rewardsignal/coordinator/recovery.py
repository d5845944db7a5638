"""Bringing a coordinator back from its data directory after a crash or restart.

What was committed comes back exactly once:
- each run at its newest valid checkpoint, with its optimizer state, then
  forward to the last step a client was answered: ``optim_step`` checkpoints are
  written in the background, and a step whose checkpoint had not landed is
  replayed from its durable inputs (its gradients and its stored arguments);
- gradients accepted since that checkpoint are added back; ones computed on an
  older version were consumed by the step that made a newer one, and are dropped;
- every accepted request that had not finished is queued again in its original
  order, its arguments read back by its operation; a request whose effect is
  already durable (an ``optim_step`` whose checkpoint landed, a
  ``forward_backward`` whose gradient was kept) is answered from that state
  instead of being applied twice (``Operation.recovered``);
- a federated job resumes at its first uncommitted round;
- workers keep their ids (they carry on polling without re-registering).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.coordinator import ops
from rewardsignal.coordinator.federated.job import FederatedJob
from rewardsignal.coordinator.runs.accumulator import Contribution
from rewardsignal.coordinator.runs.processor import Op
from rewardsignal.coordinator.runs.state import Run, RunSpec
from rewardsignal.coordinator.services import Services
from rewardsignal.data.examples import example_to_datum

log = logging.getLogger("signal.coordinator")


async def restore(ctx: Services, adopt: Callable[[Run], None]) -> None:
    manifests = await _restore_runs(ctx, adopt)
    for w in await ctx.db.workers():
        ctx.scheduler.restore_worker(w["worker_id"], w)
    for state in await ctx.db.jobs():
        if state["run_id"] in ctx.runs:
            job = await asyncio.to_thread(_load_job, ctx, state)
            ctx.jobs[job.job_id] = job
    await _requeue_requests(ctx, manifests)


async def _restore_runs(ctx: Services, adopt: Callable[[Run], None]) -> dict[str, dict]:
    """Each run at its newest valid checkpoint; the manifests of those."""
    manifests: dict[str, dict] = {}
    for spec_json in await ctx.db.runs():
        spec = RunSpec.from_json(spec_json)
        loaded = await ctx.versions.load(spec)
        if loaded is None:
            log.warning("run %s has no valid checkpoint; skipped", spec.run_id)
            continue
        run, manifests[spec.run_id] = loaded
        adopt(run)
        await _restore_gradients(ctx, run)
        log.info("run resumed run_id=%s version=%d pending_forward_backward=%d", run.run_id,
                 run.version, run.accum.calls)
    return manifests


async def _restore_gradients(ctx: Services, run: Run) -> None:
    await ctx.pending.drop_before(run.run_id, run.version)
    rows = await ctx.pending.load(run.run_id)
    await _replay_steps(ctx, run, rows)
    for row, grads in rows:
        if row["version"] < run.version:
            continue  # consumed by a replayed step
        await asyncio.to_thread(run.accum.add, _contribution(row, grads))
        run.recovered_grads.add(row["request_id"])


def _contribution(row: dict, grads: Tensors) -> Contribution:
    return Contribution(row["request_id"], grads, row["weight"], row["reduction"],
                        row["tokens"], row["loss_sum"], row["loss_weight"])


async def _replay_steps(ctx: Services, run: Run, rows: list[tuple[dict, Tensors]]) -> None:
    """Steps that finished after the run's newest checkpoint (written in the
    background, it had not landed): applied again, in order, from the gradients
    they consumed, so the run comes back at the version its clients were told."""
    for done in await ctx.db.done_requests(run.run_id, "optim_step"):
        target = done["result"].get("version")
        if not isinstance(target, int) or target <= run.version:
            continue
        operation = ops.get("optim_step")
        inputs = [(row, g) for row, g in rows if row["version"] == run.version]
        if target != run.version + 1 or not inputs or not done["args"]:
            log.error("cannot replay step to version %s of run %s from version %d (its inputs "
                      "are gone); the run resumes at version %d", target, run.run_id,
                      run.version, run.version)
            return
        for row, grads in inputs:
            await asyncio.to_thread(run.accum.add, _contribution(row, grads))
        args = await asyncio.to_thread(operation.load, ctx, run, done["args"])
        await operation.replay(ctx, run, args, done["request_id"])
        log.info("step replayed run=%s version=%d", run.run_id, run.version)


async def _requeue_requests(ctx: Services, manifests: dict[str, dict]) -> None:
    requeued = 0
    for row in await ctx.db.open_requests():
        run = ctx.runs.get(row["run_id"])
        if run is None:
            await ctx.db.finish_request(row["request_id"], "failed", {"error": {
                "code": "not_found", "message": "the run is gone"}})
            continue
        operation = ops.get(row["kind"])
        done = operation.recovered(run, row["request_id"], manifests[run.run_id])
        if done is not None:
            await ctx.db.finish_request(row["request_id"], "done", done)
            continue
        req = ctx.requests.create(row["owner"], run.run_id, row["kind"],
                                  request_id=row["request_id"])
        args = await asyncio.to_thread(operation.load, ctx, run, row["args"])
        assert run.processor is not None
        run.processor.put(Op(operation, req, args, row["timeout_s"]))
        requeued += 1
    if requeued:
        log.info("requeued %d requests accepted before the restart", requeued)


def _load_job(ctx: Services, state: dict) -> FederatedJob:
    run = ctx.runs[state["run_id"]]
    raw = ctx.job_store.read_datums(state["job_id"])
    tok = ctx.tokenizers.get(run.spec.base_model)
    job = FederatedJob.from_state(state, [example_to_datum(d, tok) for d in raw["train"]],
                                  [example_to_datum(d, tok) for d in raw["eval"]])
    # A round whose checkpoint landed but whose job record did not: count it.
    last = run.history[-1] if run.history else {}
    if last.get("job_id") == job.job_id and last.get("round", 0) > job.round:
        job.round = last["round"]
        job.history.append({"round": job.round, "version": last["version"],
                            "train_loss": last.get("loss"), "eval_loss": None,
                            "accepted": None, "duration_s": 0.0, "recovered": True})
    if job.status == "running":
        job.status = "queued"
    return job
