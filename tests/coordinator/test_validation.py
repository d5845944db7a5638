"""Every rejection the aggregator makes, through the real HTTP surface: the
submission is refused with its reason, the task goes back to the queue, and the
run does not change."""

from __future__ import annotations

import pytest
import torch
from apphelpers import DROP, FakeWorker, Harness

from rewardsignal.protocol import tensors_to_bytes

BATCH = [{"text": "one two"}, {"input": "2+2=", "output": "4"}]


def _setup(h: Harness):
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                       expect=201)
    worker = FakeWorker(h)
    _, req = h.request("POST", f"/v1/runs/{run['run_id']}/forward_backward",
                       json={"batch": BATCH}, expect=202)
    task = worker.lease()
    assert task is not None and task["kind"] == "forward_backward"
    return run["run_id"], worker, task, req["request_id"]


def _valid(h: Harness, run_id: str, task: dict, scale: float = 0.01) -> dict:
    run = h.coordinator.runs[run_id]
    grads = {k: torch.full(s, scale) for k, s in run.shapes.items()}
    datums = task["payload"]["datums"]
    return {"codec": "fp32", "tensors": tensors_to_bytes(grads),
            "result": {"loss_sum": 3.0, "weight_sum": 5.0, "num_tokens": 9,
                       "logprobs": [[-1.0] * len(d["model_input"]) for d in datums]}}


def _snapshot(h: Harness, run_id: str):
    run = h.coordinator.runs[run_id]
    return run.version, {k: v.clone() for k, v in run.adapter.items()}, run.accum.empty


def _assert_unchanged(h: Harness, run_id: str, before) -> None:
    version, adapter, empty = _snapshot(h, run_id)
    assert version == before[0]
    assert all(torch.equal(adapter[k], before[1][k]) for k in adapter)
    assert empty == before[2]


def _corrupt(kind: str, h: Harness, run_id: str, task: dict) -> dict:
    msg = _valid(h, run_id, task)
    shapes = h.coordinator.runs[run_id].shapes
    name = sorted(shapes)[0]
    if kind == "stale":
        msg["version"] = task["version"] + 1
    elif kind == "fingerprint":
        msg["fingerprint"] = "sha256:" + "0" * 64
    elif kind in ("shape", "nonfinite", "norm", "names", "dtype"):
        grads = {k: torch.full(s, 0.01) for k, s in shapes.items()}
        if kind == "shape":
            grads[name] = torch.zeros(shapes[name][0] + 1, shapes[name][1])
        elif kind == "nonfinite":
            grads[name][0, 0] = float("nan")
        elif kind == "norm":
            grads[name] = torch.full(shapes[name], 1e9)
        elif kind == "names":
            grads["base_model.model.evil.lora_A.weight"] = torch.zeros(2, 2)
        elif kind == "dtype":
            grads[name] = grads[name].double()
        msg["tensors"] = tensors_to_bytes(grads)
    elif kind == "malformed":
        msg["tensors"] = b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"data_offsets\": [0, 99]}}"
    return msg


@pytest.mark.parametrize("kind, status", [
    ("stale", 422), ("fingerprint", 422), ("shape", 422), ("nonfinite", 422),
    ("norm", 422), ("names", 422), ("dtype", 422), ("malformed", 422),
])
def test_rejections_leave_the_run_unchanged(tmp_path, kind, status):
    h = Harness(tmp_path / "data", delta_norm_max=1e3)
    try:
        run_id, worker, task, request_id = _setup(h)
        before = _snapshot(h, run_id)
        code, body = worker.submit(task, **_corrupt(kind, h, run_id, task))
        assert code == status, body
        assert body["error"]["code"] == f"rejected_{kind}"
        _assert_unchanged(h, run_id, before)
        _, metrics = h.request("GET", "/metrics", expect=200)
        assert f'signal_updates_rejected_total{{reason="{kind}"}} 1.0' in metrics.decode()
        # The task went back to the queue: an honest worker finishes the request.
        again = worker.lease()
        assert again is not None and again["task_id"] == task["task_id"]
        code, body = worker.submit(again, **_valid(h, run_id, again))
        assert (code, body["status"]) == (200, "accepted")
        _, done = h.request("GET", f"/v1/requests/{request_id}?timeout_s=5", expect=200)
        assert done["result"]["loss"] == pytest.approx(3.0 / 5.0)
        assert not h.coordinator.runs[run_id].accum.empty
    finally:
        h.close()


def test_unknown_lease_and_duplicate_are_no_ops(harness):
    h = harness
    run_id, worker, task, request_id = _setup(h)
    before = _snapshot(h, run_id)
    code, body = worker.submit({**task, "lease_id": "l-forged"}, **_valid(h, run_id, task))
    assert code == 409 and body["error"]["code"] == "unknown_lease"
    _assert_unchanged(h, run_id, before)

    code, body = worker.submit(task, **_valid(h, run_id, task))
    assert (code, body["status"]) == (200, "accepted")
    h.request("GET", f"/v1/requests/{request_id}?timeout_s=5", expect=200)
    accum = h.coordinator.runs[run_id].accum
    weight_after_first = accum.weight_mean
    grad_after_first = {k: v.clone() for k, v in accum.mean.value().items()}
    # A replay of the same submission is acknowledged and ignored.
    code, body = worker.submit(task, **_valid(h, run_id, task, scale=5.0))
    assert (code, body["status"]) == (200, "duplicate")
    assert accum.weight_mean == weight_after_first
    assert all(torch.equal(accum.mean.value()[k], grad_after_first[k]) for k in grad_after_first)


def test_missing_fields_in_submission(harness):
    h = harness
    run_id, worker, task, _ = _setup(h)
    before = _snapshot(h, run_id)
    code, body = worker.submit(task, **{**_valid(h, run_id, task), "tensors": DROP})
    assert code == 422 and body["error"]["code"] == "rejected_malformed"
    # A rejection ends the lease: the same lease cannot try again.
    code, body = worker.submit(task, **_valid(h, run_id, task))
    assert code == 409 and body["error"]["code"] == "unknown_lease"
    task = worker.lease()
    code, body = worker.submit(task, **{**_valid(h, run_id, task), "result": {"loss_sum": "x"}})
    assert code == 422 and body["error"]["code"] == "rejected_nonfinite"
    code, _ = h.request("POST", f"/v1/tasks/{task['task_id']}/result", data=b"\xc1\xc1garbage",
                        headers={"Content-Type": "application/msgpack"})
    assert code == 400
    _assert_unchanged(h, run_id, before)


def test_quarantine_after_repeated_rejections(tmp_path):
    h = Harness(tmp_path / "data", quarantine_after=2)
    try:
        run_id, worker, task, _ = _setup(h)
        for _ in range(2):
            t = task if _ == 0 else worker.lease()
            code, _b = worker.submit(t, **{**_valid(h, run_id, t), "fingerprint": "sha256:x"})
            assert code == 422
        code, body = h.request("POST", f"/v1/workers/{worker.worker_id}/lease?timeout_s=0")
        assert code == 403 and body["error"]["code"] == "quarantined"
        assert "rejected submissions in a row" in body["error"]["message"]
    finally:
        h.close()
