"""The operator's models file: parsed strictly, enforced at create_run, listed
with what the fleet can serve, required off loopback."""

from __future__ import annotations

import json

import pytest
from apphelpers import FakeWorker, Harness, fake_step

from rewardsignal.coordinator.catalog import load_catalog
from rewardsignal.coordinator.config import CoordinatorConfig
from rewardsignal.errors import ValidationError

MODELS_YAML = """\
models:
  - name: signal-tiny
    family: llama
    notes: built-in, for tests
  - name: HuggingFaceTB/SmolLM2-135M
    revision: main
"""


def test_yaml_and_json_files_parse(tmp_path):
    yml = tmp_path / "models.yaml"
    yml.write_text(MODELS_YAML)
    cat = load_catalog(yml)
    assert [e.name for e in cat.entries] == ["signal-tiny", "HuggingFaceTB/SmolLM2-135M"]
    assert cat.entries[0].family == "llama" and cat.entries[1].revision == "main"
    js = tmp_path / "models.json"
    js.write_text(json.dumps([{"name": "signal-tiny"}, "signal-small"]))
    assert [e.name for e in load_catalog(js).entries] == ["signal-tiny", "signal-small"]


@pytest.mark.parametrize("text, match", [
    ("models: []\n", "non-empty list"),
    ("models:\n  - name: a/b\n    size: 7\n", r"entry 1: unknown field\(s\) \['size'\]"),
    ("models:\n  - family: llama\n", "entry 1: 'name' must be a non-empty string"),
    ("models:\n  - a/b\n  - a/b\n", "'a/b' is listed twice"),
    ("models: [\n", "does not parse"),
])
def test_bad_models_files_name_the_file_and_entry(tmp_path, text, match):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ValidationError, match=match) as err:
        load_catalog(path)
    assert str(path) in err.value.message
    with pytest.raises(ValidationError, match="models file .*missing.yaml"):
        load_catalog(tmp_path / "missing.yaml")


def test_non_loopback_needs_a_models_file(tmp_path):
    exposed = dict(data_dir=tmp_path, host="0.0.0.0", api_keys=("sk",), worker_tokens=("wt",))
    with pytest.raises(ValidationError, match="without --models FILE"):
        CoordinatorConfig(**exposed).check_exposure()
    (tmp_path / "m.yaml").write_text(MODELS_YAML)
    CoordinatorConfig(**exposed, models=load_catalog(tmp_path / "m.yaml")).check_exposure()
    CoordinatorConfig(data_dir=tmp_path).check_exposure()  # loopback: as before


def test_only_listed_models_and_what_the_fleet_has(tmp_path):
    (tmp_path / "models.yaml").write_text(MODELS_YAML)
    h = Harness(tmp_path / "data", models=load_catalog(tmp_path / "models.yaml"))
    try:
        status, body = h.request("POST", "/v1/runs", json={"base_model": "signal-small"})
        assert status == 400 and str(tmp_path / "models.yaml") in body["error"]["message"]
        assert h.request("GET", "/v1/runs", expect=200)[1]["runs"] == []  # nothing made
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                           expect=201)
        worker = FakeWorker(h, "gpu-0")
        _, listed = h.request("GET", "/v1/models", expect=200)
        models = {m["model_id"]: m for m in listed["models"]}
        assert list(models) == ["signal-tiny", "HuggingFaceTB/SmolLM2-135M"]
        tiny, hub = models["signal-tiny"], models["HuggingFaceTB/SmolLM2-135M"]
        assert tiny["source"] == "builtin" and tiny["param_count"] > 0
        assert tiny["family"] == "llama" and tiny["notes"] == "built-in, for tests"
        assert hub["source"] == "hub" and hub["revision"] == "main"
        assert hub["param_count"] is None  # not downloaded just to be listed
        assert tiny["workers_able"] == hub["workers_able"] == 1
        assert tiny["workers_loaded"] == 0
        fake_step(h, worker, run["run_id"])
        models = {m["model_id"]: m for m in h.request("GET", "/v1/models")[1]["models"]}
        assert models["signal-tiny"]["workers_loaded"] == 1
        assert models["HuggingFaceTB/SmolLM2-135M"]["workers_loaded"] == 0
        assert "models file" in listed["note"]
    finally:
        h.close()
