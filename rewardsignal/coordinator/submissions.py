"""Worker submissions: the task message a worker leases, and the checks every
submission passes before it may touch a run (the aggregator's validation).
Decoding and tensor checks run in a thread (``asyncio.to_thread``)."""

from __future__ import annotations

import asyncio
import logging
import math

from rewardsignal.aggregation.codecs import decode
from rewardsignal.aggregation.validate import validate_update
from rewardsignal.coordinator.runs import Run
from rewardsignal.coordinator.scheduler import Task, WorkerInfo
from rewardsignal.errors import ConflictError, RejectedUpdate, ValidationError
from rewardsignal.protocol import tensors_from_bytes

log = logging.getLogger("signal.coordinator")


def task_message(coord, task: Task, lease_id: str) -> dict:
    run = coord.runs[task.run_id]
    sha = coord.store.adapter_sha256(run.run_id, task.version)
    return {"task_id": task.task_id, "lease_id": lease_id, "kind": task.kind,
            "run_id": run.run_id, "base_model": run.spec.base_model,
            "fingerprint": run.spec.fingerprint, "version": task.version,
            "lora": run.spec.lora.to_json(),
            "weights_url": f"/v1/runs/{run.run_id}/weights/{task.version}",
            "weights_sha256": sha, "lease_timeout_s": coord.config.lease_timeout_s,
            "payload": task.payload}


async def submit(coord, worker: WorkerInfo, task_id: str, msg: dict) -> dict:
    if task_id in coord.scheduler.finished:
        coord.metrics.duplicates.inc()
        return {"status": "duplicate"}
    lease_id = msg.get("lease_id")
    try:
        task = coord.scheduler.check_lease(task_id, str(lease_id), worker.worker_id)
    except ConflictError:
        coord.metrics.updates_rejected.labels("unknown_lease").inc()
        coord.rejections["unknown_lease"] += 1
        raise
    if "error" in msg:
        error = str(msg.get("error"))[:500]
        log.warning("task failed on worker task=%s worker=%s error=%s", task_id, worker.name,
                    error)
        coord.scheduler.release(task, lease_id, f"worker {worker.name}: {error}")
        return {"status": "released"}
    run = coord.runs[task.run_id]
    try:
        result = await asyncio.to_thread(_check_result, coord, task, run, msg)
    except RejectedUpdate as exc:
        if task.job_id in coord.jobs:
            coord.jobs[task.job_id].note_rejection(exc.reason)
        coord.metrics.updates_rejected.labels(exc.reason).inc()
        coord.rejections[exc.reason] += 1
        coord.scheduler.note_rejection(worker, exc.reason)
        coord.scheduler.release(task, lease_id, exc.message)
        log.warning("update rejected task=%s worker=%s reason=%s detail=%s", task_id,
                    worker.name, exc.reason, exc.detail)
        raise
    if task.done or task.claimed:  # another lease won while this one was checked
        coord.metrics.duplicates.inc()
        return {"status": "duplicate"}
    task.claimed = True  # claimed on the event loop: exactly one submission gets past here
    if task.sink is not None:
        await asyncio.to_thread(task.sink.add, result.pop("grads"))
    coord.scheduler.complete(task, lease_id, result, tokens=task.tokens,
                            duration_s=float(msg.get("duration_s") or 0.0))
    coord.metrics.updates_accepted.labels(task.kind).inc()
    return {"status": "accepted"}

def _decode_tensors(coord, msg: dict, kind: str) -> dict:
    codec = msg.get("codec", "fp32")
    raw = msg.pop("tensors", None)  # dropped once decoded: only the fp32 copy stays alive
    if not isinstance(raw, bytes):
        raise RejectedUpdate("malformed", "missing 'tensors' (safetensors bytes)")
    coord.metrics.bytes_in.labels(kind, str(codec)[:8]).inc(len(raw))
    try:
        return decode(tensors_from_bytes(raw), str(codec))
    except ValidationError as exc:
        raise RejectedUpdate("malformed", exc.message) from None

def _check_delta(coord, task: Task, run: Run, msg: dict, metrics: dict) -> dict:
    delta = _decode_tensors(coord, msg, "delta")
    staleness, norm = validate_update(
        delta, weight=1.0, expected_shapes=run.shapes, task_version=task.version,
        current_version=run.version, fingerprint=msg["fingerprint"],
        expected_fingerprint=run.spec.fingerprint, limits=task.limits or coord.limits)
    coord.metrics.staleness.observe(staleness)
    coord.metrics.update_norm.observe(norm)
    return {"delta": delta, "metrics": metrics, "version": task.version}

def _check_result(coord, task: Task, run: Run, msg: dict) -> dict:
    """Decode and validate a submission (runs in a thread: tensor work)."""
    fp = msg.get("fingerprint")
    if not isinstance(fp, str) or fp != run.spec.fingerprint:
        raise RejectedUpdate("fingerprint", f"base model fingerprint {str(fp)[:19]}... does "
                             f"not match the run's {run.spec.fingerprint[:19]}...")
    if msg.get("version") != task.version:
        raise RejectedUpdate("stale", f"computed on version {msg.get('version')!r}, the task "
                             f"named version {task.version}")
    result = msg.get("result")
    if not isinstance(result, dict):
        raise RejectedUpdate("malformed", "missing 'result' object")
    if task.kind == "sample":
        return _check_sample(result, task)
    if task.kind == "train":
        return _check_delta(coord, task, run, msg, _check_train_metrics(result))
    checked = _check_forward(result, task)
    if task.kind == "forward_backward":
        grads = _decode_tensors(coord, msg, "gradient")
        staleness, norm = validate_update(
            grads, weight=checked["weight_sum"], expected_shapes=run.shapes,
            task_version=task.version, current_version=run.version, fingerprint=fp,
            expected_fingerprint=run.spec.fingerprint, limits=coord.limits)
        coord.metrics.staleness.observe(staleness)
        coord.metrics.update_norm.observe(norm)
        checked["grads"] = grads
    return checked


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_forward(result: dict, task: Task) -> dict:
    datums = task.payload["datums"]
    lps = result.get("logprobs")
    if not _finite(result.get("loss_sum")) or not _finite(result.get("weight_sum")):
        raise RejectedUpdate("nonfinite", "loss_sum and weight_sum must be finite numbers")
    if not isinstance(lps, list) or len(lps) != len(datums):
        raise RejectedUpdate("malformed", f"expected logprobs for {len(datums)} datums")
    for lp, d in zip(lps, datums, strict=True):
        if not isinstance(lp, list) or len(lp) != len(d["model_input"]):
            raise RejectedUpdate("shape", "logprobs length does not match the datum")
        if not all(_finite(x) for x in lp):
            raise RejectedUpdate("nonfinite", "logprobs contain NaN or infinity")
    return {"loss_sum": float(result["loss_sum"]), "weight_sum": float(result["weight_sum"]),
            "logprobs": lps}


_TRAIN_METRICS = ("train_loss_mean", "train_loss_last", "grad_norm_mean", "steps", "num_samples",
                  "tokens", "duration_s")


def _check_train_metrics(result: dict) -> dict:
    for key in _TRAIN_METRICS:
        if not _finite(result.get(key)):
            raise RejectedUpdate("malformed", f"train metrics need a finite {key!r}")
    if result["tokens"] <= 0 or result["steps"] <= 0:
        raise RejectedUpdate("malformed", "train metrics report no work")
    return {k: float(result[k]) for k in _TRAIN_METRICS}


def _check_sample(result: dict, task: Task) -> dict:
    outs = result.get("outputs")
    n = len(task.payload["prompt_tokens"])
    if not isinstance(outs, list) or len(outs) != n:
        raise RejectedUpdate("malformed", f"expected {n} sample outputs")
    for o in outs:
        if (not isinstance(o, dict) or not isinstance(o.get("text"), str)
                or not isinstance(o.get("tokens"), list) or not isinstance(o.get("logprobs"), list)
                or len(o["tokens"]) != len(o["logprobs"])
                or len(o["tokens"]) > task.payload["max_tokens"]
                or not all(isinstance(t, int) for t in o["tokens"])
                or not all(_finite(x) for x in o["logprobs"])):
            raise RejectedUpdate("malformed", "sample output must have text, tokens and "
                                 "matching finite logprobs")
    return {"outputs": outs}
