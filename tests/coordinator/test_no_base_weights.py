"""The coordinator never loads a base model to create or train a run: shapes
come from a meta-device skeleton, and the fingerprint hashes the weight files
one tensor at a time (memory-mapped), so the coordinator's memory never holds
more than one tensor of the base. A merged export is made by a worker, which
uploads the files; the coordinator only measures and keeps them."""

from __future__ import annotations

import hashlib

import pytest
import safetensors.torch
import transformers
from apphelpers import FakeWorker, Harness


def _refuse(*args, **kwargs):
    raise AssertionError("the coordinator loaded base-model weights")


@pytest.fixture
def harness(tmp_path, monkeypatch):
    for target, name in ((transformers.PreTrainedModel, "from_pretrained"),
                         (transformers.AutoModelForCausalLM, "from_pretrained"),
                         (safetensors.torch, "load_file"), (safetensors.torch, "load")):
        monkeypatch.setattr(target, name, _refuse)
    h = Harness(tmp_path / "data")
    yield h
    h.close()


@pytest.mark.parametrize("model", ["signal-tiny", "signal-small"])
def test_creating_a_run_and_saving_its_adapter_load_no_base_weights(harness, model):
    _, run = harness.request("POST", "/v1/runs", json={"base_model": model, "lora_r": 4},
                             expect=201)
    assert run["version"] == 0
    _, saved = harness.request("POST", f"/v1/runs/{run['run_id']}/save_state",
                               json={"mode": "adapter"}, expect=202)
    _, done = harness.request("GET", f"/v1/requests/{saved['request_id']}?timeout_s=30",
                              expect=200)
    assert done["result"]["files"]


def test_the_guard_catches_a_model_load(harness):
    from rewardsignal.models import load_model

    with pytest.raises(AssertionError, match="loaded base-model weights"):
        load_model("signal-tiny")


def _put(h, task, name, data, *, sha=None, lease_id=None, worker=None):
    return h.request("PUT", f"/v1/tasks/{task['task_id']}/files/{name}"
                     f"?lease_id={lease_id or task['lease_id']}", data=data, headers={
                         "X-Signal-Sha256": sha or hashlib.sha256(data).hexdigest(),
                         "X-Signal-Worker": worker or task["_worker"]})


def test_a_merged_export_is_made_by_a_worker_and_checked_file_by_file(harness, monkeypatch):
    from rewardsignal.coordinator.ops import save_state

    monkeypatch.setattr(save_state, "export_budget", lambda run: 4096)
    h = harness
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                       expect=201)
    old = FakeWorker(h, "old")  # declares no optional task kinds: never gets an export
    w = FakeWorker(h, "new", tasks=["export_merged"])
    _, saved = h.request("POST", f"/v1/runs/{run['run_id']}/save_state",
                         json={"mode": "merged", "name": "m"}, expect=202)
    assert old.lease(timeout_s=0.5) is None
    task = w.lease()
    task["_worker"] = w.worker_id
    assert task["kind"] == "export_merged" and task["version"] == 0
    assert task["payload"]["max_bytes"] == 4096
    assert task["payload"]["adapter_config"]["r"] == 2
    weights, config = b"\x01" * 1000, b'{"model_type": "llama"}'

    # Refused, and nothing kept: a wrong sha256, a name that is not a plain file
    # name, another lease, a task of another kind, more than the budget.
    assert _put(h, task, "model.safetensors", weights, sha="0" * 64)[0] == 400
    assert _put(h, task, ".hidden", config)[0] == 400
    assert _put(h, task, "artifact.json", config)[0] == 400
    assert _put(h, task, "config.json", config, lease_id="l-nope")[0] == 409
    assert _put(h, task, "config.json", config, worker=old.worker_id)[0] == 409
    assert _put(h, task, "big.bin", b"x" * 5000)[0] == 413
    upload_root = (h.coordinator.services.artifacts.upload_dir(run["run_id"], task["task_id"],
                                                               task["lease_id"]))
    assert not upload_root.exists() or not any(upload_root.iterdir())

    # Uploaded, then a result that names a file never uploaded: rejected, the
    # lease released, and the task leased again (the first lease's files go).
    assert _put(h, task, "model.safetensors", weights)[0] == 201
    assert _put(h, task, "model.safetensors", weights)[0] == 409  # once per lease
    files = [{"path": "model.safetensors", "bytes": 1000,
              "sha256": hashlib.sha256(weights).hexdigest()}]
    status, _ = w.submit(task, result={"files": [*files, {"path": "config.json", "bytes": 23,
                                                          "sha256": "1" * 64}]})
    assert status == 422
    again = w.lease()
    again["_worker"] = w.worker_id
    assert again["task_id"] == task["task_id"] and again["lease_id"] != task["lease_id"]
    for name, data in (("model.safetensors", weights), ("config.json", config)):
        assert _put(h, again, name, data)[0] == 201
    files.append({"path": "config.json", "bytes": len(config),
                  "sha256": hashlib.sha256(config).hexdigest()})
    status, body = w.submit(again, result={"files": files})
    assert (status, body["status"]) == (200, "accepted")

    _, done = h.request("GET", f"/v1/requests/{saved['request_id']}?timeout_s=10", expect=200)
    meta = done["result"]
    assert (meta["mode"], meta["name"], meta["version"]) == ("merged", "m", 0)
    assert sorted(f["path"] for f in meta["files"]) == ["config.json", "model.safetensors"]
    _, got = h.request("GET", f"/v1/runs/{run['run_id']}/artifacts/m/files/model.safetensors",
                       expect=200)
    assert got == weights
    leftovers = [p.name for p in (h.coordinator.services.artifacts.root / run["run_id"]).iterdir()
                 if p.name.startswith(".")]
    assert leftovers == []
