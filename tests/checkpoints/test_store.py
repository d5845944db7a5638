import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from rewardsignal.checkpoints import CheckpointStore, export_adapter, export_merged
from rewardsignal.errors import CheckpointError, NotFoundError, ValidationError
from rewardsignal.lora import adapter_config_json, init_adapter
from rewardsignal.models import load_model


@pytest.fixture
def adapter(tiny_spec):
    a = init_adapter("signal-tiny", tiny_spec)
    # a non-zero B so the adapter changes the model's output
    return {k: (v if "lora_A" in k else torch.full_like(v, 0.05)) for k, v in a.items()}


def _write(store, v, adapter, tiny_spec, **kw):
    return store.write("run1", v, adapter=adapter, optimizer={"exp_avg.x": torch.ones(3)},
                       adapter_config=adapter_config_json(tiny_spec, "signal-tiny"),
                       parent_version=v - 1 if v else None, **kw)


def test_round_trip(tmp_path, adapter, tiny_spec):
    store = CheckpointStore(tmp_path)
    path = _write(store, 0, adapter, tiny_spec, metrics={"loss": 1.5})
    assert path.name == "v000000"
    ck = store.load("run1", 0)
    assert ck.manifest["metrics"] == {"loss": 1.5}
    assert ck.manifest["files"]["adapter_model.safetensors"]["sha256"]
    assert all(torch.equal(ck.adapter[k], adapter[k]) for k in adapter)
    assert torch.equal(ck.optimizer["exp_avg.x"], torch.ones(3))
    assert store.latest("run1") == 0
    with pytest.raises(CheckpointError, match="immutable"):
        _write(store, 0, adapter, tiny_spec)


def test_an_adapter_file_made_and_hashed_by_the_caller_is_written_as_given(
        tmp_path, adapter, tiny_spec):
    from rewardsignal.coordinator.runs.versions import make_adapter_file

    data, sha = make_adapter_file(adapter)
    store = CheckpointStore(tmp_path)
    path = _write(store, 0, adapter, tiny_spec, adapter_bytes=data, adapter_sha256=sha)
    assert (path / "adapter_model.safetensors").read_bytes() == data
    ck = store.load("run1", 0)  # every file checked against the manifest's hashes
    assert ck.manifest["files"]["adapter_model.safetensors"]["sha256"] == sha
    assert all(torch.equal(ck.adapter[k], adapter[k]) for k in adapter)


def test_hash_mismatch_is_detected(tmp_path, adapter, tiny_spec):
    store = CheckpointStore(tmp_path)
    _write(store, 0, adapter, tiny_spec)
    _write(store, 1, adapter, tiny_spec)
    f = store.path("run1", 1) / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: sha256"):
        store.load("run1", 1)
    assert store.latest("run1") == 0  # the corrupt newest one is skipped


def test_crash_mid_write_leaves_previous_latest(tmp_path, adapter, tiny_spec, monkeypatch):
    store = CheckpointStore(tmp_path)
    _write(store, 0, adapter, tiny_spec)

    def crash(*a, **k):
        raise OSError("simulated power loss before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        _write(store, 1, adapter, tiny_spec)
    monkeypatch.undo()
    assert store.latest("run1") == 0
    assert store.versions("run1") == [0]
    # a leftover temp dir from a hard kill (no cleanup ran) is ignored, then pruned
    (store.run_dir("run1") / ".tmp-v000001-abc").mkdir()
    assert store.latest("run1") == 0
    _write(store, 1, adapter, tiny_spec)
    assert store.latest("run1") == 1
    assert not list(store.run_dir("run1").glob(".tmp-*"))


def test_retention_keeps_last_n_and_named(tmp_path, adapter, tiny_spec):
    store = CheckpointStore(tmp_path, keep_last=2)
    _write(store, 0, adapter, tiny_spec)
    _write(store, 1, adapter, tiny_spec)
    store.pin("run1", 1, "good-one")
    for v in range(2, 6):
        _write(store, v, adapter, tiny_spec)
    assert store.versions("run1") == [1, 4, 5]
    assert store.resolve("run1", "good-one") == 1
    assert store.resolve("run1", "latest") == 5
    with pytest.raises(NotFoundError):
        store.resolve("run1", "nope")
    with pytest.raises(ValidationError):
        store.pin("run1", 4, "../evil")


def test_peft_export_loads_with_plain_peft(tmp_path, adapter, tiny_spec):
    store = CheckpointStore(tmp_path / "ck")
    path = _write(store, 0, adapter, tiny_spec)
    # The checkpoint directory itself loads unchanged, and so does an export.
    precision = {"base_dtype": "bf16", "quantization": "nf4"}
    exported = export_adapter(path, tmp_path / "exported", precision=precision)
    # The precision it was trained against is beside the PEFT files, not in them.
    assert json.loads((exported / "signal_export.json").read_text())["precision"] == precision
    for d in (path, exported):
        model = PeftModel.from_pretrained(load_model("signal-tiny"), str(d))
        state = get_peft_model_state_dict(model)
        assert state.keys() == adapter.keys()
        assert all(torch.equal(state[k], adapter[k]) for k in adapter)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["r"] == tiny_spec.r and cfg["peft_type"] == "LORA"


def test_merged_export_loads_with_plain_transformers(tmp_path, adapter, tiny_spec):
    store = CheckpointStore(tmp_path / "ck")
    path = _write(store, 0, adapter, tiny_spec)
    out = export_merged(path, "signal-tiny", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    peft_model = PeftModel.from_pretrained(load_model("signal-tiny"), str(path))
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = load_model("signal-tiny")(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(base, want, atol=1e-3)  # the adapter really changed something
