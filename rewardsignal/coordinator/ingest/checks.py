"""The checks a worker's submission passes before it may touch a run, as pure
functions of the task, what the coordinator knows of the run, and the message.

Each check raises ``RejectedUpdate(reason, message)``. Decoding and tensor
checks are CPU work: callers run ``check_submission`` in a thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rewardsignal.aggregation.codecs import decode
from rewardsignal.aggregation.tensors import Tensors
from rewardsignal.aggregation.validate import UpdateLimits, check_fingerprint, validate_update
from rewardsignal.coordinator.scheduling.tasks import Task, Uploads
from rewardsignal.errors import RejectedUpdate, ValidationError
from rewardsignal.protocol import tensors_from_bytes

TRAIN_METRICS = ("train_loss_mean", "train_loss_last", "grad_norm_mean", "steps", "num_samples",
                 "tokens", "duration_s")


@dataclass(frozen=True)
class RunView:
    """What the checks need to know of the run a task belongs to."""

    fingerprint: str
    version: int
    shapes: dict[str, tuple[int, ...]]


@dataclass
class Checked:
    """A submission that passed: ``result`` is what the task's future resolves
    to; ``tensors`` the decoded gradient (summed, not stored on the future)."""

    result: dict
    tensors: Tensors | None = field(default=None, repr=False)
    staleness: int | None = None
    norm: float | None = None


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


_NUMBERS = frozenset((int, float))


def _all_finite(xs: list) -> bool:
    """Every item an int or float (not a bool, string or list) and finite: what
    ``all(_finite(x) for x in xs)`` says, at a fifth of its cost on a result's
    logprobs (one float per token)."""
    if not set(map(type, xs)) <= _NUMBERS:
        return False
    try:
        return bool(np.isfinite(np.asarray(xs, dtype=np.float64)).all())
    except OverflowError:  # an int beyond float64
        return False


def decode_tensors(msg: dict) -> Tensors:
    """The submitted tensors in fp32. The raw bytes are dropped from ``msg`` once
    decoded so only the fp32 copy stays alive."""
    codec = str(msg.get("codec", "fp32"))
    raw = msg.pop("tensors", None)
    if not isinstance(raw, bytes | memoryview):  # memoryview: a ``RESULT`` body's tail
        raise RejectedUpdate("malformed", "missing 'tensors' (safetensors bytes)")
    try:
        return decode(tensors_from_bytes(raw), codec)
    except ValidationError as exc:
        raise RejectedUpdate("malformed", exc.message) from None


def check_submission(task: Task, run: RunView, msg: dict, limits: UpdateLimits) -> Checked:
    """Decode and validate a submission for ``task``; cheapest checks first."""
    fp = msg.get("fingerprint")
    check_fingerprint(fp if isinstance(fp, str) else repr(fp), run.fingerprint)
    if msg.get("version") != task.version:
        raise RejectedUpdate("stale", f"computed on version {msg.get('version')!r}, the task "
                             f"named version {task.version}")
    result = msg.get("result")
    if not isinstance(result, dict):
        raise RejectedUpdate("malformed", "missing 'result' object")
    if task.kind == "sample":
        return Checked(check_sample(result, task.payload))
    if task.kind == "export_merged":
        lease_id = str(msg.get("lease_id"))
        return Checked(check_export(result, task.uploads.get(lease_id, Uploads()), lease_id))
    if task.kind == "train":
        metrics = check_train_metrics(result)
        return _with_tensors(task, run, msg, task.limits or limits, weight=1.0,
                             result={"metrics": metrics, "version": task.version},
                             key="delta")
    checked = check_forward(result, task.payload["datums"])
    if task.kind != "forward_backward":
        return Checked(checked)
    return _with_tensors(task, run, msg, limits, weight=checked["weight_sum"], result=checked,
                         key=None)


def _with_tensors(task: Task, run: RunView, msg: dict, limits: UpdateLimits, *, weight: float,
                  result: dict, key: str | None) -> Checked:
    tensors = decode_tensors(msg)
    staleness, norm = validate_update(
        tensors, weight=weight, expected_shapes=run.shapes, task_version=task.version,
        current_version=run.version, limits=limits)
    if key is not None:  # a federated delta travels on the task's result
        return Checked({**result, key: tensors}, None, staleness, norm)
    return Checked(result, tensors, staleness, norm)


def check_export(result: dict, uploads: Uploads, lease_id: str) -> dict:
    """A merged export's result lists the files its worker uploaded, each with
    the size and sha256 the coordinator measured as it wrote them: the files of
    the export are exactly those (no file named that never arrived, none left
    out, none still arriving)."""
    if uploads.receiving:
        raise RejectedUpdate("malformed", f"{sorted(uploads.receiving)[:5]} are still being "
                             "uploaded: send the result once every upload has finished")
    uploaded = uploads.done
    files = result.get("files")
    if not isinstance(files, list) or not files or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
        raise RejectedUpdate("malformed", "an export's result lists its files "
                             "([{path, bytes, sha256}, ...])")
    listed = {f["path"]: f for f in files}
    if set(listed) != set(uploaded):
        raise RejectedUpdate("names", f"the result lists {sorted(listed)[:5]} but "
                             f"{sorted(uploaded)[:5]} were uploaded")
    for name, got in uploaded.items():
        if (listed[name].get("bytes"), listed[name].get("sha256")) != (got["bytes"],
                                                                       got["sha256"]):
            raise RejectedUpdate("malformed", f"{name}: the result's size or sha256 is not "
                                 "what was uploaded")
    return {"files": [{"path": n, **uploaded[n]} for n in sorted(uploaded)],
            "lease_id": lease_id}


def check_forward(result: dict, datums: list[dict]) -> dict:
    lps = result.get("logprobs")
    if not _finite(result.get("loss_sum")) or not _finite(result.get("weight_sum")):
        raise RejectedUpdate("nonfinite", "loss_sum and weight_sum must be finite numbers")
    if not isinstance(lps, list) or len(lps) != len(datums):
        raise RejectedUpdate("malformed", f"expected logprobs for {len(datums)} datums")
    for lp, d in zip(lps, datums, strict=True):
        if not isinstance(lp, list) or len(lp) != len(d["model_input"]):
            raise RejectedUpdate("shape", "logprobs length does not match the datum")
        if not _all_finite(lp):
            raise RejectedUpdate("nonfinite", "logprobs contain NaN or infinity")
    return {"loss_sum": float(result["loss_sum"]), "weight_sum": float(result["weight_sum"]),
            "logprobs": lps}


def check_train_metrics(result: dict) -> dict:
    for key in TRAIN_METRICS:
        if not _finite(result.get(key)):
            raise RejectedUpdate("malformed", f"train metrics need a finite {key!r}")
    if result["tokens"] <= 0 or result["steps"] <= 0:
        raise RejectedUpdate("malformed", "train metrics report no work")
    return {k: float(result[k]) for k in TRAIN_METRICS}


def _check_sequence(o: object, max_tokens: int) -> None:
    if (not isinstance(o, dict) or not isinstance(o.get("text"), str)
            or not isinstance(o.get("tokens"), list) or not isinstance(o.get("logprobs"), list)
            or len(o["tokens"]) != len(o["logprobs"]) or len(o["tokens"]) > max_tokens
            or o.get("stop_reason", "length") not in ("stop", "length")
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in o["tokens"])
            or not _all_finite(o["logprobs"])):
        raise RejectedUpdate("malformed", "sample output must have text, tokens, matching "
                             "finite logprobs and a stop_reason of 'stop' or 'length'")


def check_sample(result: dict, payload: dict) -> dict:
    """One sequence per (prompt, sample), prompt-major; prompt logprobs (None,
    then one finite number per further prompt token) when they were asked for."""
    outs = result.get("outputs")
    prompts = payload["prompt_tokens"]
    n = len(prompts) * payload.get("num_samples", 1)
    if not isinstance(outs, list) or len(outs) != n:
        raise RejectedUpdate("malformed", f"expected {n} sample outputs")
    for o in outs:
        _check_sequence(o, payload["max_tokens"])
    checked = {"outputs": outs}
    if payload.get("prompt_logprobs"):
        lps = result.get("prompt_logprobs")
        if not isinstance(lps, list) or len(lps) != len(prompts) or not all(
                isinstance(lp, list) and len(lp) == len(p) and lp[0] is None
                and _all_finite(lp[1:]) for lp, p in zip(lps, prompts, strict=False)):
            raise RejectedUpdate("malformed", "prompt_logprobs must hold, per prompt, None "
                                 "then one finite logprob per further prompt token")
        checked["prompt_logprobs"] = lps
    return checked
