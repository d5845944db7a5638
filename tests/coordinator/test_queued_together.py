"""``POST /v1/runs/{run_id}/requests``: several operations queued in one call,
in order, all or none, answered together."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
import torch
from apphelpers import FakeWorker, Harness, new_run

from rewardsignal.protocol import tensors_to_bytes

DATUM = {"model_input": [1, 5, 6], "loss_fn_inputs": {"target_tokens": [5, 6, 2],
                                                      "weights": [1, 1, 1]}}
STEP = [{"op": "forward_backward", "args": {"batch": [DATUM]}},
        {"op": "optim_step", "args": {"learning_rate": 0.01}}]


def _compute(h, worker: FakeWorker, run_id: str) -> None:
    task = worker.lease()
    grads = {k: torch.full(s, 0.1) for k, s in h.coordinator.runs[run_id].shapes.items()}
    code, _ = worker.submit(task, codec="fp32", tensors=tensors_to_bytes(grads),
                            result={"loss_sum": 2.0, "weight_sum": 3.0,
                                    "logprobs": [[-1.0] * 3]})
    assert code == 200


def test_a_step_queued_in_one_call_runs_in_order_and_is_answered_together(harness):
    h = harness
    run_id = new_run(h)
    worker = FakeWorker(h)
    _, queued = h.request("POST", f"/v1/runs/{run_id}/requests", json={"requests": STEP},
                          expect=202)
    fb, step = queued["requests"]
    assert (fb["kind"], step["kind"]) == ("forward_backward", "optim_step")
    assert fb["status"] == step["status"] == "pending"
    _compute(h, worker, run_id)
    _, done = h.request("GET", f"/v1/requests/{step['request_id']}?timeout_s=5", expect=200)
    assert done["result"]["version"] == 1
    _, done = h.request("GET", f"/v1/requests/{fb['request_id']}?timeout_s=5", expect=200)
    assert done["result"]["loss"] == pytest.approx(2.0 / 3.0)

    # ?wait_s: still running when the wait ends, each one's state, 202.
    started = time.monotonic()
    _, pending = h.request("POST", f"/v1/runs/{run_id}/requests?wait_s=0.3",
                           json={"requests": STEP}, expect=202)
    assert time.monotonic() - started >= 0.3
    assert [r["status"] for r in pending["requests"]] == ["pending", "pending"]
    _compute(h, worker, run_id)
    for r in pending["requests"]:
        h.request("GET", f"/v1/requests/{r['request_id']}?timeout_s=5", expect=200)
    assert h.coordinator.runs[run_id].version == 2

    # Finished within the wait: 200 with every result; a failure is its own
    # state (here a step with nothing accumulated).
    _, answered = h.request("POST", f"/v1/runs/{run_id}/requests?wait_s=5", json={
        "requests": [{"op": "save_state", "args": {"name": "two"}},
                     {"op": "optim_step", "args": {}}]}, expect=200)
    saved, failed = answered["requests"]
    assert saved["status"] == "done" and saved["result"]["version"] == 2
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request"
    assert "call forward_backward before optim_step" in failed["error"]["message"]


BAD = "invalid_request"


@pytest.mark.parametrize("body, status, code, match", [
    ({"requests": []}, 400, BAD, "at least one operation"),
    ({"requests": {"op": "optim_step"}}, 400, BAD, "'requests' must be a list"),
    ({"requests": STEP, "extra": 1}, 400, BAD, "unknown field"),
    ({"requests": [STEP[0], "optim_step"]}, 400, BAD,
     r"requests\[1\]: requests\[1\] must be a JSON object"),
    ({"requests": [STEP[0], {"op": "no_such_op"}]}, 400, BAD,
     r"requests\[1\] \(no_such_op\): unknown operation 'no_such_op'"),
    ({"requests": [STEP[0], {"op": "optim_step", "args": {"learning_rate": -1}}]}, 400, BAD,
     r"requests\[1\] \(optim_step\): field 'learning_rate'"),
    ({"requests": [STEP[0], {"op": "optim_step", "args": {"lr": 0.1}}]}, 400, BAD,
     r"requests\[1\] \(optim_step\): unknown field\(s\) \['lr'\]"),
    ({"requests": [{"op": "optim_step", "args": {}, "when": "now"}]}, 400, BAD,
     r"requests\[0\] \(optim_step\): unknown field\(s\) \['when'\]"),
    ({"requests": [STEP[0], {"op": "train_federated", "args": {"examples": [{"text": "a"}]}}]},
     400, BAD, "train_federated is not queued with other operations"),
    ({"requests": STEP * 33}, 400, BAD, "at most 64"),
    # Each refused as its own route refuses it, with its status and code.
    ({"requests": [{"op": "forward_backward", "args": {"batch": []}}, STEP[1]]}, 400,
     "invalid_data", r"requests\[0\] \(forward_backward\): .*batch"),
    ({"requests": [STEP[0], {"op": "load_state", "args": {"name": "nope"}}]}, 404,
     "not_found", r"requests\[1\] \(load_state\): .*nope"),
])
def test_one_bad_operation_and_none_is_queued(harness, body, status, code, match):
    h = harness
    run_id = new_run(h)
    got, err = h.request("POST", f"/v1/runs/{run_id}/requests", json=body)
    assert (got, err["error"]["code"]) == (status, code), err
    assert re.search(match, err["error"]["message"]), err["error"]["message"]
    coord = h.coordinator
    assert not [r for r in coord.requests._items.values() if r.run_id == run_id]
    assert not coord.scheduler.tasks
    assert h.call(coord.services.db.open_requests()) == []


def test_a_retry_with_the_same_key_gets_the_first_answer_and_queues_nothing_more(tmp_path):
    """Whether the first call is still being accepted, done, or from before a
    restart; and a key first used for another kind of call is a 409."""
    h = Harness(tmp_path / "data")
    try:
        run_id = new_run(h)
        headers = {"X-Idempotency-Key": "step-1"}
        path = f"/v1/runs/{run_id}/requests"

        async def twice_at_once():
            return [await r.json() for r in await asyncio.gather(*(
                h.client.post(path, json={"requests": STEP}, headers=headers)
                for _ in range(2)))]

        first, concurrent = h.call(twice_at_once())
        assert concurrent == first and len(first["requests"]) == 2
        code, again = h.request("POST", path, json={"requests": STEP}, headers=headers)
        assert code == 202 and again == first
        ids = [r["request_id"] for r in first["requests"]]
        assert [r["request_id"] for r in h.call(h.coordinator.services.db.open_requests())] == ids
        # The same key on the single-operation route, and a run's key on this one.
        for route, body, key in ((f"/v1/runs/{run_id}/optim_step", {}, "step-1"),
                                 (path, {"requests": STEP}, "run-key")):
            if key == "run-key":
                h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                          headers={"X-Idempotency-Key": key}, expect=201)
            for wait in ("", "?wait_s=1"):
                code, err = h.request("POST", route + wait, json=body,
                                      headers={"X-Idempotency-Key": key})
                assert code == 409 and err["error"]["code"] == "idempotency_key_reused", err
        assert [r["request_id"] for r in h.call(h.coordinator.services.db.open_requests())] == ids
    finally:
        h.close()
    # After a restart: the stored answer, and ?wait_s waits on the recovered requests.
    h = Harness(tmp_path / "data")
    try:
        worker = FakeWorker(h)
        code, replayed = h.request("POST", f"/v1/runs/{run_id}/requests",
                                   json={"requests": STEP}, headers=headers)
        assert code == 202 and [r["request_id"] for r in replayed["requests"]] == ids
        _compute(h, worker, run_id)
        code, done = h.request("POST", f"/v1/runs/{run_id}/requests?wait_s=5",
                               json={"requests": STEP}, headers=headers)
        assert code == 200 and [r["status"] for r in done["requests"]] == ["done", "done"]
        assert done["requests"][1]["result"]["version"] == 1
        assert h.call(h.coordinator.services.db.open_requests()) == []
    finally:
        h.close()


def test_a_forward_backward_that_fails_fails_the_step_queued_behind_it(tmp_path):
    h = Harness(tmp_path / "data", max_task_attempts=1)
    try:
        run_id = new_run(h)
        worker = FakeWorker(h)
        _, queued = h.request("POST", f"/v1/runs/{run_id}/requests", json={"requests": STEP},
                              expect=202)
        task = worker.lease()
        code, _ = worker.submit(task, error="out of memory")
        assert code == 200
        fb, step = (h.request("GET", f"/v1/requests/{r['request_id']}?timeout_s=5")[1]
                    for r in queued["requests"])
        assert fb["status"] == "failed" and "out of memory" in fb["error"]["message"]
        assert step["status"] == "failed" and "call forward_backward before optim_step" in (
            step["error"]["message"])
        assert h.coordinator.runs[run_id].version == 0
    finally:
        h.close()
