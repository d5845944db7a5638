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


def _merged_by_hand(h, run_id: str, version: int, lora_r: int, alpha: float) -> dict:
    """The run's version merged into signal-tiny by the formula (base + (B @ A) *
    alpha / r), from the base's file and the weights endpoint, in this process."""
    from safetensors import safe_open

    from rewardsignal.models import resolve_model_path
    from rewardsignal.protocol import tensors_from_bytes

    with safe_open(resolve_model_path("signal-tiny") / "model.safetensors", "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    _, raw = h.request("GET", f"/v1/runs/{run_id}/weights/{version}", expect=200)
    adapter = tensors_from_bytes(raw)
    touched = 0
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight"):
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            merged[name] = merged[name] + (b @ a) * (alpha / lora_r)
            touched += bool((b @ a).abs().max() > 0)
    assert touched  # the step moved the adapter: the merge is not the base
    return merged


def _lease(w):
    task = w.lease()
    task["_worker"] = w.worker_id
    return task


def test_a_merged_export_is_made_by_a_worker_and_checked_against_the_base(harness):
    """A worker's merged weights are checked tensor by tensor against the base
    and the adapter (which the coordinator never loads whole): tampered ones are
    refused and another worker is asked; the config and tokenizer come from the
    base's own files. Bad uploads are refused and change nothing."""
    from apphelpers import fake_step
    from safetensors.torch import save

    h = harness
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                       expect=201)
    rid = run["run_id"]
    w1 = FakeWorker(h, "w1", tasks=["export_merged"])
    fake_step(h, w1, rid)  # version 1, B != 0 (w1 alone: no check to wait for)
    old = FakeWorker(h, "old")  # declares no optional task kinds: never gets an export
    w2 = FakeWorker(h, "w2", tasks=["export_merged"])
    _, saved = h.request("POST", f"/v1/runs/{rid}/save_state",
                         json={"mode": "merged", "name": "m"}, expect=202)
    assert old.lease(timeout_s=0.5) is None
    task = _lease(w1)
    assert (task["kind"], task["version"]) == ("export_merged", 1)
    assert task["payload"]["adapter_config"]["r"] == 2
    honest = save(_merged_by_hand(h, rid, 1, 2, run["lora_alpha"]))
    target = next(k for k in _merged_by_hand(h, rid, 1, 2, run["lora_alpha"])
                  if k.endswith("q_proj.weight"))
    bad = _merged_by_hand(h, rid, 1, 2, run["lora_alpha"])
    bad[target] = bad[target] + 1e-2
    tampered = save(bad)

    # Refused, and nothing kept: a wrong sha256, names that are not weights,
    # another lease, another worker.
    assert _put(h, task, "model.safetensors", honest, sha="0" * 64)[0] == 400
    for name in (".hidden.safetensors", "config.json", "evil.py", "artifact.json"):
        assert _put(h, task, name, b"{}")[0] == 400, name
    assert _put(h, task, "model.safetensors", honest, lease_id="l-nope")[0] == 409
    assert _put(h, task, "model.safetensors", honest, worker=old.worker_id)[0] == 409
    folder = h.coordinator.services.artifacts.upload_dir(rid, task["task_id"], task["lease_id"])
    assert not folder.exists() or not any(folder.iterdir())

    # w1 uploads tampered weights: its result lists them correctly, so the task
    # completes, but the check against the base refuses them; w1 is not asked
    # again, w2 is.
    assert _put(h, task, "model.safetensors", tampered)[0] == 201
    assert _put(h, task, "model.safetensors", tampered)[0] == 409  # once per lease
    listed = [{"path": "model.safetensors", "bytes": len(tampered),
               "sha256": hashlib.sha256(tampered).hexdigest()}]
    status, body = w1.submit(task, result={"files": listed})
    assert (status, body["status"]) == (200, "accepted")
    again = _lease(w2)
    assert again["task_id"] != task["task_id"]
    assert w1.lease(timeout_s=0.3) is None  # excluded from the retry
    assert _put(h, again, "model.safetensors", honest)[0] == 201
    status, _ = w2.submit(again, result={"files": [{"path": "other.safetensors", "bytes": 1,
                                                    "sha256": "1" * 64}]})
    assert status == 422  # lists a file never uploaded: rejected, leased again
    again = _lease(w2)
    assert _put(h, again, "model.safetensors", honest)[0] == 201
    status, body = w2.submit(again, result={"files": [{
        "path": "model.safetensors", "bytes": len(honest),
        "sha256": hashlib.sha256(honest).hexdigest()}]})
    assert (status, body["status"]) == (200, "accepted")

    _, done = h.request("GET", f"/v1/requests/{saved['request_id']}?timeout_s=20", expect=200)
    meta = done["result"]
    assert (meta["mode"], meta["name"], meta["version"]) == ("merged", "m", 1)
    names = {f["path"] for f in meta["files"]}
    assert {"model.safetensors", "config.json", "tokenizer.json", "signal_export.json"} <= names
    _, got = h.request("GET", f"/v1/runs/{rid}/artifacts/m/files/model.safetensors",
                       expect=200)
    assert got == honest
    _, cfg = h.request("GET", f"/v1/runs/{rid}/artifacts/m/files/config.json", expect=200)
    assert "auto_map" not in cfg and cfg["dtype"] == "float32"
    leftovers = [p.name for p in (h.coordinator.services.artifacts.root / rid).iterdir()
                 if p.name.startswith(".")]
    assert leftovers == []


def test_uploads_in_parallel_cannot_pass_the_budget_together(harness, monkeypatch):
    import asyncio

    from rewardsignal.coordinator.ops import save_state

    monkeypatch.setattr(save_state, "export_budget", lambda run: 4096)
    h = harness
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                       expect=201)
    w = FakeWorker(h, "w", tasks=["export_merged"])
    h.request("POST", f"/v1/runs/{run['run_id']}/save_state", json={"mode": "merged"},
              expect=202)
    task = _lease(w)
    assert task["payload"]["max_bytes"] == 4096
    data = b"x" * 3000

    async def put(name):
        resp = await h.client.put(
            f"/v1/tasks/{task['task_id']}/files/{name}?lease_id={task['lease_id']}", data=data,
            headers={"X-Signal-Sha256": hashlib.sha256(data).hexdigest(),
                     "X-Signal-Worker": w.worker_id})
        return resp.status

    async def both():
        return await asyncio.gather(put("a.safetensors"), put("b.safetensors"))

    assert sorted(h.call(both())) == [201, 413]
    assert _put(h, task, "c.safetensors", b"y" * 2000)[0] == 413  # 3000 of 4096 used


def test_a_merged_export_with_no_worker_that_runs_it_fails_clearly(tmp_path):
    h = Harness(tmp_path / "data", no_worker_grace_s=1.0)
    try:
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                           expect=201)
        old = FakeWorker(h, "old")  # serves the run, but predates merged exports
        assert old.worker_id
        _, saved = h.request("POST", f"/v1/runs/{run['run_id']}/save_state",
                             json={"mode": "merged"}, expect=202)
        for _ in range(10):  # the first answer says it waits for a worker
            _, body = h.request("GET", f"/v1/requests/{saved['request_id']}?timeout_s=5")
            if body["status"] != "pending":
                break
            assert body["waiting_for_workers"] is True
        assert body["status"] == "failed" and body["error"]["code"] == "no_worker", body
        assert "merged" not in str(old.lease(timeout_s=0.2))  # never leased to it
    finally:
        h.close()


def test_half_done_export_folders_are_swept_at_start(tmp_path):
    h = Harness(tmp_path / "data")
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                       expect=201)
    root = h.coordinator.services.artifacts.root / run["run_id"]
    h.close()
    for d in (".upload-t-1/l-1", ".tmp-m"):
        (root / d).mkdir(parents=True)
        (root / d / "model.safetensors").write_bytes(b"x")
    (root / "kept").mkdir()  # a saved state's folder stays
    h = Harness(tmp_path / "data")
    try:
        assert sorted(p.name for p in root.iterdir()) == ["kept"]
    finally:
        h.close()


def test_a_merged_export_goes_only_to_a_worker_with_the_host_memory_for_it(harness):
    """The merge loads the base at fp32 in host memory: a worker that declared
    less is not asked (one that declared none is not held to it)."""
    from rewardsignal.memory import shape_of, weight_bytes

    h = harness
    fp32 = weight_bytes(shape_of("signal-tiny"), "fp32")
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                       expect=201)
    small = FakeWorker(h, "small", tasks=["export_merged"], host_memory_bytes=fp32)
    h.request("POST", f"/v1/runs/{run['run_id']}/save_state", json={"mode": "merged"},
              expect=202)
    assert small.lease(timeout_s=0.5) is None
    big = FakeWorker(h, "big", tasks=["export_merged"], host_memory_bytes=2 * fp32)
    task = big.lease()
    assert task["kind"] == "export_merged"
    _, st = h.request("GET", "/v1/workers", expect=200)
    by_name = {w["name"]: w for w in (st["workers"] if isinstance(st, dict) else st)}
    assert by_name["big"]["host_memory_bytes"] == 2 * fp32
    assert by_name["big"]["tasks"] == ["export_merged"] and by_name["small"]["tasks"]
