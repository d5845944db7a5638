"""A lease that ends while its result is being checked (it expired, or its
worker was withdrawn): the result is refused as ``unknown_lease``, counts for
nothing, and the task goes to the next worker, whose result is the step's."""

from __future__ import annotations

import torch
from apphelpers import FakeWorker, Harness, new_run

from rewardsignal.coordinator.ingest import accept
from rewardsignal.protocol import tensors_to_bytes


def test_a_lease_that_ends_while_its_result_is_checked_is_refused(tmp_path, monkeypatch):
    # Verification off: the second worker's result counts at once (not held for a
    # check by the first).
    h = Harness(tmp_path / "data", verify_fraction=0.0, probation_tasks=0)
    try:
        _lease_ends_mid_check(h, monkeypatch)
    finally:
        h.close()


def _lease_ends_mid_check(h, monkeypatch) -> None:
    coord = h.coordinator
    run_id = new_run(h)
    first, second = FakeWorker(h, "first"), FakeWorker(h, "second")
    _, req = h.request("POST", f"/v1/runs/{run_id}/forward_backward",
                       json={"batch": [{"text": "hello"}]}, expect=202)
    task = first.lease()
    real_check = accept.check_submission

    def lease_ends_meanwhile(t, view, msg, limits):
        # What expire_leases does to a lease past its time, while the check runs.
        coord.scheduler.release(t, msg["lease_id"], "lease expired during the check")
        return real_check(t, view, msg, limits)

    monkeypatch.setattr(accept, "check_submission", lease_ends_meanwhile)
    shapes = coord.runs[run_id].shapes
    result = {"loss_sum": 1.0, "weight_sum": 2.0,
              "logprobs": [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]}
    code, body = first.submit(task, codec="fp32", result=result,
                              tensors=tensors_to_bytes({k: torch.full(s, 5.0)
                                                        for k, s in shapes.items()}))
    assert code == 409 and body["error"]["code"] == "unknown_lease", body
    assert "ended while its result was checked" in body["error"]["message"]
    assert coord.ingest.rejections["unknown_lease"] == 1
    monkeypatch.setattr(accept, "check_submission", real_check)

    again = second.lease()
    assert again is not None and again["task_id"] == task["task_id"]
    code, _ = second.submit(again, codec="fp32", result=result,
                            tensors=tensors_to_bytes({k: torch.full(s, 0.25)
                                                      for k, s in shapes.items()}))
    assert code == 200
    h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)
    # The step's gradient is the second worker's alone: the refused one added nothing.
    grads = coord.runs[run_id].accum.gradient()
    assert all(torch.equal(g, torch.full_like(g, 0.25 / 2.0)) for g in grads.values()), grads
