"""``POST /v1/runs/{run_id}/requests``: several operations queued in one call,
in order, all or none, answered together."""

from __future__ import annotations

import re
import time

import pytest
import torch
from apphelpers import FakeWorker, new_run

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
    # state (the step after a forward_backward that failed fails too).
    _, answered = h.request("POST", f"/v1/runs/{run_id}/requests?wait_s=5", json={
        "requests": [{"op": "save_state", "args": {"name": "two"}},
                     {"op": "optim_step", "args": {}}]}, expect=200)
    saved, failed = answered["requests"]
    assert saved["status"] == "done" and saved["result"]["version"] == 2
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_request"
    assert "call forward_backward before optim_step" in failed["error"]["message"]


@pytest.mark.parametrize("body, match", [
    ({"requests": []}, "at least one operation"),
    ({"requests": {"op": "optim_step"}}, "'requests' must be a list"),
    ({"requests": STEP, "extra": 1}, "unknown field"),
    ({"requests": [STEP[0], "optim_step"]}, r"requests\[1\]: requests\[1\] must be a JSON object"),
    ({"requests": [STEP[0], {"op": "no_such_op"}]}, r"requests\[1\]: unknown operation 'no_such_op'"),
    ({"requests": [STEP[0], {"op": "optim_step", "args": {"learning_rate": -1}}]},
     r"requests\[1\]: field 'learning_rate'"),
    ({"requests": [STEP[0], {"op": "optim_step", "args": {"lr": 0.1}}]},
     r"requests\[1\]: unknown field\(s\) \['lr'\]"),
    ({"requests": [{"op": "optim_step", "args": {}, "when": "now"}]},
     r"requests\[0\]: unknown field\(s\) \['when'\]"),
    ({"requests": [{"op": "forward_backward", "args": {"batch": []}}, STEP[1]]},
     r"requests\[0\]: .*batch"),
    ({"requests": [STEP[0], {"op": "train_federated", "args": {"examples": [{"text": "a"}]}}]},
     "train_federated is not queued with other operations"),
    ({"requests": STEP * 33}, "at most 64"),
])
def test_one_bad_operation_and_none_is_queued(harness, body, match):
    h = harness
    run_id = new_run(h)
    code, err = h.request("POST", f"/v1/runs/{run_id}/requests", json=body)
    assert code == 400, err
    assert err["error"]["code"] == "invalid_request"
    assert re.search(match, err["error"]["message"]), err["error"]["message"]
    run = h.coordinator.runs[run_id]
    assert run.processor.queue.empty() and not h.coordinator.scheduler.tasks
    assert h.call(h.coordinator.services.db.open_requests()) == []


def test_a_retry_with_the_same_key_gets_the_first_answer_and_queues_nothing_more(harness):
    h = harness
    run_id = new_run(h)
    headers = {"X-Idempotency-Key": "step-1"}
    _, first = h.request("POST", f"/v1/runs/{run_id}/requests", json={"requests": STEP},
                         headers=headers, expect=202)
    code, again = h.request("POST", f"/v1/runs/{run_id}/requests", json={"requests": STEP},
                            headers=headers)
    assert code == 202 and again == first
    open_ids = [r["request_id"] for r in h.call(h.coordinator.services.db.open_requests())]
    assert open_ids == [r["request_id"] for r in first["requests"]]
