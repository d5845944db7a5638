"""The check of a ``sample`` result: another worker's forward pass over the
returned tokens must give the logprobs the sampler claimed (far cheaper than
generating again, and independent of the sampler's random draws).

A sample's logprobs are ``log_softmax(logits / T)`` at its temperature T (under
the model itself for greedy decoding, ``worker.sampling``): at T other than 0
and 1 the forward task carries ``logit_temperature`` T and goes only to workers
that declared they can compute it (``protocol.CHECK_FEATURES``); the bound
grows by 1/T below 1, as differences in the logits do. On a disagreement a
third worker's forward pass decides: the
sampler is quarantined if it sides with the checker (and the group is sampled
again elsewhere), the checker if it sides with the sampler.
"""

from __future__ import annotations

from rewardsignal.aggregation.agreement import LOGPROB_SCALE
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.scheduling.tasks import Task
from rewardsignal.coordinator.trust.verify import Outcome, Verifier


def forward_payload(payload: dict, result: dict) -> dict | None:
    """A ``forward`` task over each returned sequence (prompt + tokens), at the
    sample's temperature; None when no sequence has a token to check."""
    prompts = payload["prompt_tokens"]
    n = payload.get("num_samples", 1)
    datums = []
    for i, out in enumerate(result["outputs"]):
        p, toks = prompts[i // n], out["tokens"]
        if not toks:
            continue
        datums.append({"model_input": p + toks[:-1], "loss_fn_inputs": {
            "target_tokens": p[1:] + toks,
            "weights": [0.0] * (len(p) - 1) + [1.0] * len(toks)}})
    if not datums:
        return None
    out = {"datums": datums, "loss_fn": "cross_entropy", "loss_fn_config": {}}
    temperature = payload.get("temperature", 1.0)
    if temperature not in (0, 1):
        out["logit_temperature"] = float(temperature)
    return out


def _incapable(v: Verifier, payload: dict) -> set[str]:
    """Workers that cannot compute ``payload`` (one at a logit temperature)."""
    if "logit_temperature" not in payload:
        return set()
    return {w.worker_id for w in v.scheduler.workers.values()
            if "logit_temperature" not in w.checks}


def _claimed(result: dict) -> list[list[float]]:
    return [o["logprobs"] for o in result["outputs"] if o["tokens"]]


def _recomputed(check: Outcome, claimed: list[list[float]]) -> list[list[float]]:
    """The forward pass's logprobs of the generated tokens (each row's tail)."""
    return [row[len(row) - len(c):] for row, c in zip(check.result["logprobs"], claimed,
                                                        strict=True)]


def _close(a: list[list[float]], b: list[list[float]], bound: float) -> bool:
    return all(abs(x - y) <= bound for ra, rb in zip(a, b, strict=True)
               for x, y in zip(ra, rb, strict=True))


async def check_sample(v: Verifier, run: Run, task: Task, first: Outcome) -> Outcome | None:
    """Check ``first`` (the accepted result of sample ``task``); the result that
    counts, or None when the group must be sampled again."""
    temperature = task.payload.get("temperature", 1.0)
    payload = forward_payload(task.payload, first.result)
    if payload is None:
        v.trust.note_skipped("empty")
        return first
    # Logit differences scale by 1/T in the logprobs below T = 1.
    scale = LOGPROB_SCALE * (1.0 / temperature if 0 < temperature < 1 else 1.0)
    barred = _incapable(v, payload)
    claimed = _claimed(first.result)
    second = await v.recompute(run, task, first.worker_id, {first.worker_id} | barred,
                                "second", kind="forward", payload=payload)
    if second is None:
        return first
    bound = scale * v.tolerance_for(run, first.worker_id, second.worker_id)
    if _close(claimed, _recomputed(second, claimed), bound):
        v.trust.metrics.verdicts.labels("agree").inc()
        await v.trust.agreed(first.worker_id, second.worker_id)
        return first
    third = await v.recompute(run, task, first.worker_id,
                               {first.worker_id, second.worker_id} | barred, "tiebreak",
                               kind="forward", payload=payload)
    if third is None:
        v.trust.metrics.verdicts.labels("unresolved").inc()
        await v.trust.disagreed(first.worker_id, second.worker_id)
        return None
    with_sampler = _close(claimed, _recomputed(third, claimed),
                          scale * v.tolerance_for(run, first.worker_id, third.worker_id))
    with_checker = _close(_recomputed(second, claimed), _recomputed(third, claimed),
                          scale * v.tolerance_for(run, second.worker_id, third.worker_id))
    if with_sampler == with_checker:
        v.trust.metrics.verdicts.labels("unresolved").inc()
        await v.trust.disagreed(first.worker_id, second.worker_id, third.worker_id)
        return None
    bad, good = (second, first) if with_sampler else (first, second)
    v.trust.metrics.verdicts.labels("first_wrong" if bad is first else "checker_wrong").inc()
    await v.trust.agreed(good.worker_id, third.worker_id)
    await v.trust.disagreed(bad.worker_id)
    await v.trust.quarantine(bad.worker_id, f"sample task of run {run.run_id}: claimed logprobs "
                             "disagreed with a forward pass over its tokens; a third worker "
                             "sided with the other")
    return first if with_sampler else None
