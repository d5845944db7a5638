"""Bringing a coordinator back from its data directory after a crash or restart.

What was committed comes back exactly once:
- each run at its newest valid checkpoint, with its optimizer state;
- gradients accepted since that checkpoint are added back; ones computed on an
  older version were consumed by the step that made a newer one, and are dropped;
- every accepted request that had not finished is queued again in its original
  order; an ``optim_step`` whose checkpoint already landed is answered from it
  instead of being applied twice;
- a federated job resumes at its first uncommitted round;
- workers keep their ids (they carry on polling without re-registering).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from safetensors.torch import load_file

from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.coordinator.runs import Run, RunSpec
from rewardsignal.data.examples import example_to_datum

log = logging.getLogger("signal.coordinator")


def args_to_json(kind: str, args: dict) -> dict:
    if kind in ("forward_backward", "forward"):
        return {**args, "datums": [d.to_json() for d in args["datums"]]}
    if kind == "optim_step":
        return {"optimizer": args["optimizer"].to_json()}
    return args


def args_from_json(coord, run: Run, kind: str, args: dict) -> dict:
    if kind in ("forward_backward", "forward"):
        tok = coord.tokenizer(run.spec.base_model)
        return {**args, "datums": [example_to_datum(d, tok) for d in args["datums"]]}
    if kind == "optim_step":
        return {"optimizer": AdamWConfig(**args["optimizer"])}
    return args


def job_datums_path(coord, job_id: str) -> Path:
    return Path(coord.config.data_dir) / "jobs" / f"{job_id}.json"


async def restore(coord) -> None:
    from rewardsignal.coordinator.service import Op

    for spec_json in await coord.db.runs():
        spec = RunSpec.from_json(spec_json)
        run = await asyncio.to_thread(coord.records.load, spec)
        if run is None:
            log.warning("run %s has no valid checkpoint; skipped", spec.run_id)
            continue
        coord._adopt(run)
        await _restore_gradients(coord, run)
        log.info("run resumed run_id=%s version=%d pending_forward_backward=%d", run.run_id,
                 run.version, run.accum.calls)

    for w in await coord.db.workers():
        coord.scheduler.restore_worker(w["worker_id"], w)

    for state in await coord.db.jobs():
        if state["status"] in ("queued", "running") and state["run_id"] in coord.runs:
            job = await asyncio.to_thread(_load_job, coord, state)
            coord.jobs[job.job_id] = job
        elif state["run_id"] in coord.runs:
            coord.jobs[state["job_id"]] = await asyncio.to_thread(_load_job, coord, state)

    requeued = 0
    latest: dict[str, dict] = {}  # run id -> manifest of its current version, read once
    for row in await coord.db.open_requests():
        run = coord.runs.get(row["run_id"])
        if run is None:
            await coord.db.finish_request(row["request_id"], "failed", {"error": {
                "code": "not_found", "message": "the run is gone"}})
            continue
        if run.run_id not in latest:
            latest[run.run_id] = await asyncio.to_thread(coord.store.verify, run.run_id,
                                                         run.version)
        if (row["kind"] == "optim_step"
                and latest[run.run_id].get("request_id") == row["request_id"]):
            entry = run.history[-1] if run.history else {}
            await coord.db.finish_request(row["request_id"], "done", {
                "version": run.version, "loss": entry.get("loss"), "step": run.opt_step,
                "recovered": True})
            continue
        if row["kind"] == "forward_backward" and row["request_id"] in run.recovered_grads:
            await coord.db.finish_request(row["request_id"], "done", {
                "recovered": True, "version": run.version,
                "note": "gradient kept across a coordinator restart; logprobs were lost"})
            continue
        req = coord.requests.create(row["owner"], run.run_id, row["kind"],
                                    request_id=row["request_id"])
        args = args_from_json(coord, run, row["kind"], row["args"])
        run.ops.put_nowait(Op(row["kind"], req, args, row["timeout_s"]))
        requeued += 1
    if requeued:
        log.info("requeued %d requests accepted before the restart", requeued)


async def _restore_gradients(coord, run: Run) -> None:
    for stale in await coord.db.drop_pending_grads(run.run_id, run.version):
        Path(stale).unlink(missing_ok=True)
    for row in await coord.db.pending_grads(run.run_id):
        grads = await asyncio.to_thread(load_file, row["path"])
        await asyncio.to_thread(run.accum.add, grads, row["weight"], row["reduction"])
        run.accum.calls += 1
        run.accum.tokens += row["tokens"]
        run.accum.loss_sum += row["loss_sum"]
        run.accum.loss_weight += row["loss_weight"]
        run.recovered_grads.add(row["request_id"])


def _load_job(coord, state: dict):
    from rewardsignal.coordinator.federated import FederatedJob

    raw = json.loads(job_datums_path(coord, state["job_id"]).read_text())
    tok = coord.tokenizer(coord.runs[state["run_id"]].spec.base_model)
    job = FederatedJob.from_state(state, [example_to_datum(d, tok) for d in raw["train"]],
                                  [example_to_datum(d, tok) for d in raw["eval"]])
    run = coord.runs[state["run_id"]]
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
