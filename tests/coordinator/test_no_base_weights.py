"""The coordinator never loads a base model to create or train a run: shapes
come from a meta-device skeleton, and the fingerprint hashes the weight files
one tensor at a time (memory-mapped), so the coordinator's memory never holds
more than one tensor of the base. (A merged export is the exception: it loads
the base on the coordinator today.)"""

from __future__ import annotations

import pytest
import safetensors.torch
import transformers
from apphelpers import Harness


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
