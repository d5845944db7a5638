"""Verification in an in-process coordinator with fake workers that speak the
real protocol: who may check whom, the tie-break, and the exact removal of a
quarantined worker's part of the open step (recomputed before the step); and
the memory for gradients held for their checks (with room for one, a fleet on
probation computes one new result at a time and checks meanwhile, and every
held gradient is given back, also by a request that fails)."""

from __future__ import annotations

import asyncio
import hashlib
import math

import pytest
import torch
from apphelpers import FakeWorker, Harness

from rewardsignal.aggregation.optim import AdamWConfig, adamw_step
from rewardsignal.protocol import MSGPACK, pack, tensors_to_bytes

WEIGHT = 2.0  # every fake shard's weight sum


@pytest.fixture
def h(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=1.0, probation_tasks=1,
                worker_tokens=("tok-a", "tok-b", "tok-c"))
    yield h
    h.close()


def _run(h: Harness) -> str:
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                       expect=201)
    return run["run_id"]


def honest(h: Harness, run_id: str, payload: dict) -> dict[str, torch.Tensor]:
    """The 'true' gradient of a shard: a function of its tokens alone."""
    ids = str([d["model_input"] for d in payload["datums"]]).encode()
    scale = int(hashlib.sha256(ids).hexdigest()[:4], 16) / 65536 + 0.5
    return {k: torch.full(s, 0.01 * scale) for k, s in h.coordinator.runs[run_id].shapes.items()}


def submit(w: FakeWorker, task: dict, grads: dict[str, torch.Tensor]) -> None:
    lp = [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]
    code, body = w.submit(task, codec="fp32", tensors=tensors_to_bytes(grads),
                          result={"loss_sum": 1.0, "weight_sum": WEIGHT, "logprobs": lp})
    assert code == 200, body


def fb(h: Harness, run_id: str, text: str) -> str:
    _, req = h.request("POST", f"/v1/runs/{run_id}/forward_backward",
                       json={"batch": [{"text": text}]}, expect=202)
    return req["request_id"]


def done(h: Harness, request_id: str) -> dict:
    _, body = h.request("GET", f"/v1/requests/{request_id}?timeout_s=5", expect=200)
    assert body["status"] == "done", body
    return body


def reputation(h: Harness, w: FakeWorker) -> dict:
    return h.coordinator.services.trust.state(h.coordinator.scheduler.workers[w.worker_id])


def verdicts(h: Harness, outcome: str) -> float:
    return h.coordinator.metrics.verdicts.labels(outcome)._value.get()


def test_tiebreak_quarantines_the_minority_checker(h):
    run_id = _run(h)
    a, b, c = (FakeWorker(h, n, token=f"tok-{n}") for n in "abc")
    req = fb(h, run_id, "hello")
    task = a.lease()
    g = honest(h, run_id, task["payload"])
    submit(a, task, g)
    assert a.lease(0.3) is None  # a worker never checks itself
    check = b.lease()
    assert check["payload"] == task["payload"] and check["task_id"] != task["task_id"]
    submit(b, check, {k: -v for k, v in g.items()})
    assert a.lease(0.3) is None and b.lease(0.3) is None  # neither breaks its own tie
    submit(c, c.lease(), g)
    done(h, req)

    assert verdicts(h, "checker_wrong") == 1
    assert reputation(h, b)["state"] == "quarantined"
    assert reputation(h, a)["agreements"] == reputation(h, c)["agreements"] == 1
    accum = h.coordinator.runs[run_id].accum
    for k, v in accum.gradient().items():
        assert torch.equal(v, g[k] / WEIGHT)  # a's result counted, once
    status, _ = h.request("POST", f"/v1/workers/{b.worker_id}/lease?timeout_s=0",
                          headers=b.headers)
    assert status == 403


def test_a_fleet_of_two_cannot_break_a_tie_and_computes_the_shard_again(h):
    """Two workers that disagree with no third to decide: neither is
    quarantined, both go back on probation (one agreement ends it here), neither
    result counts, and the shard is computed afresh (and checked) until two
    results agree."""
    run_id = _run(h)
    a, b = FakeWorker(h, "a", token="tok-a"), FakeWorker(h, "b", token="tok-b")
    req = fb(h, run_id, "hello")
    task = a.lease()
    g = honest(h, run_id, task["payload"])
    submit(a, task, g)
    submit(b, b.lease(), {k: -v for k, v in g.items()})  # the check disagrees
    again = a.lease()  # no third worker: the shard itself is issued again
    assert again["payload"] == task["payload"] and again["task_id"] != task["task_id"]
    submit(a, again, g)
    submit(b, b.lease(), g)  # now they agree
    done(h, req)

    assert verdicts(h, "unresolved") == 1 and verdicts(h, "agree") == 1
    for w in (a, b):
        rep = reputation(h, w)
        assert rep["disagreements"] == 1 and rep["agreements"] == 1 and rep["streak"] == 1
        assert rep["state"] == "trusted"  # probation_tasks=1: the agreement after it
    accum = h.coordinator.runs[run_id].accum
    for k, v in accum.gradient().items():
        assert torch.equal(v, g[k] / WEIGHT)  # counted once: the agreed result


def test_workers_under_one_token_do_not_check_each_other(tmp_path):
    h = Harness(tmp_path / "data", verify_fraction=1.0, probation_tasks=1,
                worker_tokens=("tok-a", "tok-b"))
    try:
        run_id = _run(h)
        a, twin, b = (FakeWorker(h, "a", token="tok-a"), FakeWorker(h, "twin", token="tok-a"),
                      FakeWorker(h, "b", token="tok-b"))
        req = fb(h, run_id, "hello")
        task = a.lease()
        submit(a, task, honest(h, run_id, task["payload"]))
        assert twin.lease(0.6) is None  # b is live: the same volunteer may not check
        check = b.lease()
        submit(b, check, honest(h, run_id, check["payload"]))
        done(h, req)
        assert verdicts(h, "agree") == 1
        assert h.coordinator.metrics.verify_same_token._value.get() == 0
    finally:
        h.close()


def _serve(h: Harness, request_id: str, workers: list[FakeWorker], run_id: str) -> None:
    """Honest workers take whatever they may until the request is done."""
    for _ in range(40):
        for w in workers:
            task = w.lease(0.2)
            if task is not None:
                submit(w, task, honest(h, run_id, task["payload"]))
        status, body = h.request("GET", f"/v1/requests/{request_id}?timeout_s=0")
        if body["status"] != "pending":
            assert body["status"] == "done", body
            return
    raise AssertionError("the request did not finish")


def test_quarantine_takes_out_the_open_step_part_exactly(h):
    run_id = _run(h)
    run = h.coordinator.runs[run_id]
    trust = h.coordinator.services.trust
    a, b, c = (FakeWorker(h, n, token=f"tok-{n}") for n in "abc")
    v0, shards = {k: v.clone() for k, v in run.adapter.items()}, []
    # 1. a's first result is checked by b and agrees: a is trusted (probation 1).
    req = fb(h, run_id, "first")
    t1 = a.lease()
    shards.append(t1["payload"])
    submit(a, t1, honest(h, run_id, t1["payload"]))
    _serve(h, req, [b, c], run_id)
    # 2. An unchecked, wrong result of a lands in the open step.
    trust.verify_fraction = 1e-12
    req = fb(h, run_id, "second")
    t2 = a.lease()
    shards.append(t2["payload"])
    submit(a, t2, {k: 7 * v for k, v in honest(h, run_id, t2["payload"]).items()})
    done(h, req)
    # 3. Checked again, a is caught: the tie-break sides with b.
    trust.verify_fraction = 1.0
    req = fb(h, run_id, "third")
    t3 = a.lease()
    shards.append(t3["payload"])
    submit(a, t3, {k: -v for k, v in honest(h, run_id, t3["payload"]).items()})
    _serve(h, req, [b, c], run_id)
    assert reputation(h, a)["state"] == "quarantined" and verdicts(h, "first_wrong") == 1
    assert len(run.accum.owed) == 2  # a's parts of requests 1 and 2, taken out
    # 4. The step recomputes them on b and c, then applies the honest gradient.
    _, step = h.request("POST", f"/v1/runs/{run_id}/optim_step", json={}, expect=202)
    _serve(h, step["request_id"], [b, c], run_id)

    want_grad = {k: sum(honest(h, run_id, p)[k] for p in shards) / (3 * WEIGHT) for k in v0}
    want, _, _ = adamw_step(v0, want_grad, {}, 0, AdamWConfig(**run.spec.optimizer.to_json()))
    assert run.version == 1
    for k, v in want.items():
        torch.testing.assert_close(run.adapter[k], v, rtol=0, atol=1e-7)
    assert h.coordinator.metrics.recomputed.labels("step")._value.get() == 2


def test_forward_results_are_checked_too(h):
    run_id = _run(h)
    a, b, c = (FakeWorker(h, n, token=f"tok-{n}") for n in "abc")
    _, req = h.request("POST", f"/v1/runs/{run_id}/forward", json={"batch": [{"text": "hi"}]},
                       expect=202)
    task = a.lease()
    n = len(task["payload"]["datums"][0]["model_input"])

    def answer(w: FakeWorker, t: dict, logprob: float) -> None:
        code, body = w.submit(t, result={"loss_sum": 1.0, "weight_sum": WEIGHT,
                                         "logprobs": [[logprob] * n]})
        assert code == 200, body

    answer(a, task, -9.0)  # made up
    answer(b, b.lease(), -1.0)
    answer(c, c.lease(), -1.0)
    result = done(h, req["request_id"])["result"]
    assert result["logprobs"] == [[-1.0] * n]  # the honest majority's answer
    assert reputation(h, a)["state"] == "quarantined" and verdicts(h, "first_wrong") == 1


def _sample_answer(w: FakeWorker, task: dict, logprob: float) -> None:
    n = len(task["payload"]["prompt_tokens"]) * task["payload"].get("num_samples", 1)
    out = {"text": "abc", "tokens": [5, 6, 7], "logprobs": [logprob] * 3, "stop_reason": "length"}
    code, body = w.submit(task, result={"outputs": [out] * n})
    assert code == 200, body


def _forward_answer(w: FakeWorker, task: dict, logprob: float) -> None:
    datums = task["payload"]["datums"]
    assert task["kind"] == "forward"
    # The check runs over prompt + returned tokens, scoring the returned ones.
    assert datums[0]["model_input"] == [1, 2, 3, 5, 6]
    assert datums[0]["loss_fn_inputs"]["target_tokens"] == [2, 3, 5, 6, 7]
    code, body = w.submit(task, result={
        "loss_sum": 1.0, "weight_sum": 3.0,
        "logprobs": [[logprob] * len(d["model_input"]) for d in datums]})
    assert code == 200, body


def test_sample_logprobs_are_checked_by_a_forward_pass(h):
    run_id = _run(h)
    a, b, c = (FakeWorker(h, n, token=f"tok-{n}") for n in "abc")
    _, req = h.request("POST", f"/v1/runs/{run_id}/sample",
                       json={"prompt_tokens": [[1, 2, 3]], "max_tokens": 3, "seed": 1},
                       expect=202)
    _sample_answer(a, a.lease(), -0.25)  # claims logprobs its tokens do not have
    _forward_answer(b, b.lease(), -2.0)
    _forward_answer(c, c.lease(), -2.0)  # the tie-break sides with b
    # The group is sampled again by an honest worker, and checked by the other.
    again = b.lease()
    assert again["kind"] == "sample"
    assert reputation(h, a)["state"] == "quarantined" and verdicts(h, "first_wrong") == 1
    _sample_answer(b, again, -2.0)
    _forward_answer(c, c.lease(), -2.0)
    result = done(h, req["request_id"])["result"]
    assert result["logprobs"] == [[-2.0] * 3]
    assert verdicts(h, "agree") == 1


def test_a_sample_at_another_temperature_is_checked_at_that_temperature(h):
    """At temperature 0.7 the check's forward pass carries logit_temperature and
    goes only to a worker that declared it can compute it (not to b, a worker
    from before that); the claimed logprobs are compared with its answer."""
    run_id = _run(h)
    a = FakeWorker(h, "a", token="tok-a")
    b = FakeWorker(h, "b", token="tok-b")  # declares no checks
    c = FakeWorker(h, "c", token="tok-c", checks=["logit_temperature", "from-the-future"])
    assert h.coordinator.scheduler.workers[c.worker_id].checks == ("logit_temperature",)
    _, req = h.request("POST", f"/v1/runs/{run_id}/sample",
                       json={"prompt_tokens": [[1, 2, 3]], "max_tokens": 3, "seed": 1,
                             "temperature": 0.7}, expect=202)
    _sample_answer(a, a.lease(), -1.5)
    assert b.lease(0.5) is None  # cannot compute at a temperature: not its check
    check = c.lease()
    assert check["payload"]["logit_temperature"] == 0.7
    _forward_answer(c, check, -1.5)
    assert done(h, req["request_id"])["result"]["logprobs"] == [[-1.5] * 3]
    assert verdicts(h, "agree") == 1


def test_no_step_is_applied_while_a_shard_awaits_its_verdict(h):
    run_id = _run(h)
    a, b = FakeWorker(h, "a", token="tok-a"), FakeWorker(h, "b", token="tok-b")
    req = fb(h, run_id, "held for a check")
    task = a.lease()
    g = honest(h, run_id, task["payload"])
    submit(a, task, g)  # held: a is on probation
    _, step = h.request("POST", f"/v1/runs/{run_id}/optim_step", json={}, expect=202)
    # Neither the batch nor the step behind it finishes while the check is open.
    for request_id in (req, step["request_id"]):
        _, body = h.request("GET", f"/v1/requests/{request_id}?timeout_s=0.5")
        assert body["status"] != "done", body
    assert h.coordinator.runs[run_id].version == 0
    submit(b, b.lease(), g)  # the check agrees
    done(h, req)
    assert done(h, step["request_id"])["result"]["version"] == 1


# -- the memory for gradients held for their checks (``scheduling.holds``) ----------
def _fb(h: Harness, run_id: str, n: int) -> str:
    _, req = h.request("POST", f"/v1/runs/{run_id}/forward_backward",
                       json={"batch": [{"text": f"shard {i}"} for i in range(n)]}, expect=202)
    return req["request_id"]


def _gradient_bytes(h: Harness, run_id: str) -> int:
    return 4 * sum(math.prod(s) for s in h.coordinator.runs[run_id].shapes.values())


@pytest.fixture
def tight(tmp_path):
    # Room for one held gradient (0: one at a time); every result is checked.
    h = Harness(tmp_path / "data", verify_fraction=1.0, probation_tasks=100,
                verify_memory_mb=0, worker_tokens=("tok-a", "tok-b", "tok-c"))
    yield h
    h.close()


def test_a_fleet_on_probation_holds_one_gradient_at_a_time_and_steps_exactly(tight):
    h = tight
    run_id = _run(h)
    holds = h.coordinator.scheduler.holds
    g = _gradient_bytes(h, run_id)
    a, b, c = (FakeWorker(h, n, token=f"tok-{n}") for n in "abc")
    req = _fb(h, run_id, 3)
    first = a.lease()
    assert holds.used == g
    assert b.lease(0.3) is None and c.lease(0.3) is None  # no room for another
    shards = {repr(first["payload"]): honest(h, run_id, first["payload"])}
    submit(a, first, shards[repr(first["payload"])])
    check = b.lease()
    assert check["payload"] == first["payload"]  # a check, not new work
    assert holds.used == g and c.lease(0.3) is None
    submit(b, check, shards[repr(first["payload"])])  # agrees: summed, memory given back
    h.call(asyncio.sleep(0.05))
    assert holds.used == 0

    for _ in range(40):  # the other two shards and their checks, whoever leases them
        if len(shards) == 3 and holds.used == 0:
            break
        for w in (a, b, c):
            task = w.lease(0.2)
            if task is not None:
                grads = shards.setdefault(repr(task["payload"]),
                                          honest(h, run_id, task["payload"]))
                submit(w, task, grads)
            assert holds.used <= 2 * g  # one new result, and its check's until the verdict
    done(h, req)
    assert len(shards) == 3 and holds.used == 0 and holds.peak == 2 * g
    for k, v in h.coordinator.runs[run_id].accum.gradient().items():
        want = sum(x[k] for x in shards.values()) / (3 * WEIGHT)
        torch.testing.assert_close(v, want, rtol=1e-6, atol=0)


def test_results_held_when_their_request_ends_are_given_back(tight):
    h = tight
    run_id = _run(h)
    holds = h.coordinator.scheduler.holds
    a, b = FakeWorker(h, "a", token="tok-a"), FakeWorker(h, "b", token="tok-b")
    _fb(h, run_id, 2)
    task = a.lease()
    submit(a, task, honest(h, run_id, task["payload"]))
    assert holds.used == _gradient_bytes(h, run_id)  # held, its check not computed
    h.request("DELETE", f"/v1/runs/{run_id}", expect=200)
    h.call(asyncio.sleep(0.1))
    assert holds.used == 0
    assert b.lease(0.3) is None  # nothing of the deleted run is left to lease


def test_a_request_that_fails_with_results_held_gives_their_memory_back(tmp_path):
    """A held result and a failed shard sent at once: however the request takes
    them in (the check started and withdrawn, or never started), the request
    fails and the held gradient's memory is given back."""
    h = Harness(tmp_path / "data", verify_fraction=1.0, probation_tasks=100,
                max_task_attempts=1, worker_tokens=("tok-a", "tok-b"))
    try:
        run_id = _run(h)
        holds = h.coordinator.scheduler.holds
        a, b = FakeWorker(h, "a", token="tok-a"), FakeWorker(h, "b", token="tok-b")
        req = _fb(h, run_id, 2)
        ta, tb = a.lease(), b.lease()
        grads = honest(h, run_id, ta["payload"])
        lp = [[-1.0] * len(d["model_input"]) for d in ta["payload"]["datums"]]

        async def both():  # answered in the same turn of the loop
            def post(w, task, msg):
                return h.client.post(
                    f"/v1/tasks/{task['task_id']}/result", headers={"Content-Type": MSGPACK,
                                                                    **w.headers},
                    data=pack({"worker_id": w.worker_id, "lease_id": task["lease_id"],
                               "fingerprint": task["fingerprint"], "version": task["version"],
                               **msg}))
            return [r.status for r in await asyncio.gather(
                post(a, ta, {"codec": "fp32", "tensors": tensors_to_bytes(grads),
                             "result": {"loss_sum": 1.0, "weight_sum": WEIGHT, "logprobs": lp}}),
                post(b, tb, {"error": "out of memory"}))]

        assert h.call(both()) == [200, 200]
        _, body = h.request("GET", f"/v1/requests/{req}?timeout_s=5")
        assert body["status"] == "failed" and body["error"]["code"] == "task_failed", body
        h.call(asyncio.sleep(0.05))
        assert holds.used == 0
    finally:
        h.close()
