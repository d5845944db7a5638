"""A run's base precision through the real HTTP surface: it is validated, stored,
sent with each task, recorded in checkpoints and exports; only workers that
declared they can load it lease its tasks; and a gradient computed on a
differently loaded base is rejected by the fingerprint check."""

from __future__ import annotations

import json

import pytest
import torch
from apphelpers import FakeWorker, Harness

from rewardsignal.models import fingerprint
from rewardsignal.precision import Precision
from rewardsignal.protocol import tensors_to_bytes

CUDA_NF4 = {"device": "cuda:0", "precisions": {
    "auto": "bf16", "base_dtypes": ["fp32", "fp16", "bf16"], "quantization": ["nf4", "int8"]}}


def _create(h: Harness, **fields) -> dict:
    _, run = h.request("POST", "/v1/runs", expect=201,
                       json={"base_model": "signal-tiny", "lora_r": 2, **fields})
    return run


def _fb(h: Harness, run_id: str) -> str:
    _, req = h.request("POST", f"/v1/runs/{run_id}/forward_backward",
                       json={"batch": [{"text": "one two"}]}, expect=202)
    return req["request_id"]


def _gradient(h: Harness, run_id: str, task: dict, fp: str) -> dict:
    shapes = h.coordinator.runs[run_id].shapes
    return {"fingerprint": fp, "codec": "fp32",
            "tensors": tensors_to_bytes({k: torch.full(s, 0.01) for k, s in shapes.items()}),
            "result": {"loss_sum": 3.0, "weight_sum": 5.0, "num_tokens": 7, "logprobs": [
                [-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]}}


@pytest.mark.parametrize("fields, match", [
    ({"base_dtype": "int4"}, "base_dtype"),
    ({"base_dtype": 16}, "base_dtype"),
    ({"quantization": "nf3"}, "quantization"),
    ({"gpu_config": "A100-80GB:x"}, "gpu_config"),
])
def test_bad_precision_is_400_and_creates_nothing(harness, fields, match):
    status, body = harness.request("POST", "/v1/runs",
                                   json={"base_model": "signal-tiny", **fields})
    assert status == 400 and match in body["error"]["message"], body
    assert harness.request("GET", "/v1/runs", expect=200)[1]["runs"] == []


def test_precision_is_stored_sent_with_tasks_and_in_the_fingerprint(harness):
    h = harness
    run = _create(h, base_dtype="bf16", quantization="nf4")
    base_fp = fingerprint("signal-tiny")
    assert (run["base_dtype"], run["quantization"]) == ("bf16", "nf4")
    assert run["fingerprint"] == Precision("bf16", "nf4").fingerprint(base_fp) != base_fp
    # A default run keeps the bare base fingerprint (older runs and workers agree).
    assert _create(h)["fingerprint"] == base_fp

    worker = FakeWorker(h, "gpu", **CUDA_NF4)
    _fb(h, run["run_id"])
    task = worker.lease()
    assert (task["base_dtype"], task["quantization"]) == ("bf16", "nf4")
    assert task["fingerprint"] == run["fingerprint"]

    # The checkpoint's manifest records the run's precision.
    manifest = json.loads((h.coordinator.services.versions.store.path(run["run_id"], 0)
                           / "manifest.json").read_text())
    assert manifest["run"]["precision"] == {"base_dtype": "bf16", "quantization": "nf4"}


def test_a_gradient_from_a_differently_loaded_base_is_rejected(harness):
    h = harness
    run = _create(h, base_dtype="bf16", quantization="nf4")
    run_id = run["run_id"]
    worker = FakeWorker(h, "gpu", **CUDA_NF4)
    request_id = _fb(h, run_id)
    task = worker.lease()
    before = {k: v.clone() for k, v in h.coordinator.runs[run_id].adapter.items()}
    base_fp = fingerprint("signal-tiny")
    for wrong in (Precision("bf16"), Precision("bf16", "int8"), Precision("fp16", "nf4"),
                  Precision()):
        code, body = worker.submit(task, **_gradient(h, run_id, task, wrong.fingerprint(base_fp)))
        assert code == 422 and body["error"]["code"] == "rejected_fingerprint", body
        task = worker.lease()  # back in the queue after each rejection
        assert task is not None
    after = h.coordinator.runs[run_id]
    assert after.accum.empty and all(torch.equal(after.adapter[k], before[k]) for k in before)

    code, body = worker.submit(task, **_gradient(h, run_id, task, run["fingerprint"]))
    assert (code, body["status"]) == (200, "accepted")
    h.request("GET", f"/v1/requests/{request_id}?timeout_s=5", expect=200)


def test_workers_that_cannot_load_the_precision_do_not_lease_its_tasks(harness):
    h = harness
    cpu = FakeWorker(h, "cpu", precisions={"auto": "fp32", "base_dtypes": ["fp32", "bf16"],
                                           "quantization": [], "note": "no CUDA"})
    old = FakeWorker(h, "old")  # declares nothing: default-precision runs only
    nf4 = _create(h, quantization="nf4")["run_id"]
    fp16 = _create(h, base_dtype="fp16")["run_id"]
    bf16 = _create(h, base_dtype="bf16")["run_id"]
    for run_id in (nf4, fp16):
        _fb(h, run_id)
    assert cpu.lease(timeout_s=0.3) is None and old.lease(timeout_s=0.3) is None

    _fb(h, bf16)
    assert cpu.lease()["run_id"] == bf16  # it declared bf16
    assert old.lease(timeout_s=0.3) is None

    _, st = h.request("GET", "/v1/status", expect=200)
    by_name = {w["name"]: w for w in st["workers"]}
    assert by_name["cpu"]["can_serve"] == [bf16]
    assert "cannot load nf4 bases (no CUDA)" in by_name["cpu"]["cannot_serve"][nf4]
    assert "cannot load fp16" in by_name["old"]["cannot_serve"][fp16]

    gpu = FakeWorker(h, "gpu", **CUDA_NF4)
    assert {gpu.lease()["run_id"], gpu.lease()["run_id"]} == {nf4, fp16}


def test_bad_capabilities_at_registration_are_400(harness):
    for body in ({"precisions": {"quantization": ["fp8"]}}, {"precisions": []},
                 {"precisions": {"base_dtypes": ["fp64"]}}, {"memory_bytes": -1},
                 {"precisions": {"auto": "int8"}}, {"precisions": {"bogus": 1}},
                 {"checks": "logit_temperature"}, {"checks": [1]}, {"checks": ["x" * 65]}):
        status, reply = harness.request("POST", "/v1/workers/register", json={
            "name": "w", "device": "cpu", **body})
        assert status == 400, (body, reply)
    assert harness.coordinator.scheduler.workers == {}
