"""Run precision: validation, the combined fingerprint, and reading specs and
task messages written before precision existed."""

from __future__ import annotations

import pytest

from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.coordinator.runs.state import RunSpec
from rewardsignal.errors import ValidationError
from rewardsignal.lora import LoraSpec
from rewardsignal.precision import Precision, bnb_config
from rewardsignal.protocol import TaskMessage

BASE = "sha256:" + "ab" * 32


def test_fingerprint_is_the_base_one_at_the_default_and_differs_otherwise():
    assert Precision().fingerprint(BASE) == BASE
    seen = {Precision(d, q).fingerprint(BASE) for d in ("auto", "bf16", "fp16", "fp32")
            for q in (None, "nf4", "int8")}
    assert len(seen) == 12  # every precision has its own identity
    assert Precision("bf16", "nf4").fingerprint(BASE) == Precision("bf16", "nf4").fingerprint(BASE)
    assert Precision("bf16").fingerprint(BASE) != Precision("bf16").fingerprint("sha256:00")


@pytest.mark.parametrize("dtype, quant", [("int4", None), ("bf16", "fp8"), ("", None)])
def test_bad_precision_is_a_validation_error(dtype, quant):
    with pytest.raises(ValidationError):
        Precision(dtype, quant)


def test_specs_and_task_messages_from_before_precision_read_as_default():
    old = {"run_id": "run-1", "owner": "u", "base_model": "signal-tiny", "fingerprint": BASE,
           "lora": LoraSpec(r=2, alpha=4.0, target_modules=("q_proj",)).to_json(),
           "optimizer": AdamWConfig().to_json(), "max_length": 64, "created_at": 1.0}
    spec = RunSpec.from_json(old)
    assert spec.precision == Precision() and spec.gpu_config is None
    assert spec.precision.fingerprint(BASE) == spec.fingerprint
    again = RunSpec.from_json(spec.to_json())
    assert again == spec

    msg = {"task_id": "t", "lease_id": "l", "kind": "forward", "run_id": "run-1",
           "base_model": "signal-tiny", "fingerprint": BASE, "version": 0, "lora": {},
           "weights_url": "/w", "weights_sha256": "x", "lease_timeout_s": 30.0, "payload": {}}
    task = TaskMessage.from_json(msg)
    assert Precision.from_json(task.to_json()) == Precision()
    with pytest.raises(ValidationError, match="lacks"):
        TaskMessage.from_json({k: v for k, v in msg.items() if k != "payload"})


def test_bnb_config_is_plain_data_and_needs_no_bitsandbytes():
    import sys

    import torch

    nf4 = bnb_config("nf4", torch.bfloat16)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config("int8", torch.float16).load_in_8bit
    assert "bitsandbytes" not in sys.modules


def test_a_cpu_worker_declares_no_quantization_and_refuses_to_load_one():
    import torch

    from rewardsignal.models import load_model
    from rewardsignal.worker import hardware

    caps = hardware.precisions(torch.device("cpu"), "fp32")
    assert caps["quantization"] == [] and "CUDA" in caps["note"]
    assert caps["auto"] == "fp32" and "fp16" not in caps["base_dtypes"]
    with pytest.raises(ValidationError, match="needs a CUDA device"):
        load_model("signal-tiny", quantization="nf4", device="cpu")
    # Spreading a model over GPUs likewise, and a CPU worker computes on no GPU.
    with pytest.raises(ValidationError, match=r"device_map='auto' needs a CUDA device"):
        load_model("signal-tiny", device_map="auto", device="cpu")
    assert hardware.worker_gpus(torch.device("cpu"), "auto") == []
