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
    claimed = _claimed(first.result)

    def logprobs(o: Outcome) -> list[list[float]]:  # the sampler's claim, or a recomputation
        return claimed if o is first else _recomputed(o, claimed)

    def compare(a: Outcome, b: Outcome) -> str | None:
        if _close(logprobs(a), logprobs(b), scale * v.tolerance_for(run, a.worker_id,
                                                                    b.worker_id)):
            return None
        return "claimed logprobs disagreed with a forward pass over its tokens"

    got = await v.check(run, task, first, compare=compare, kind="forward", payload=payload,
                        barred=frozenset(_incapable(v, payload)), what="sample task")
    # A checker's forward pass is no sample: when it wins, the group is sampled again.
    return got if got is first else None
