"""Memory estimates from a model's config alone: the base weights within 20% of
the built-in models' measured weights (exact here), parameter counts of real
models' configs, and the parts that move with precision and tokens."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig

from rewardsignal import memory, models
from rewardsignal.errors import ValidationError


def _file_bytes(path) -> int:
    total = 0
    with safe_open(path / "model.safetensors", framework="pt") as f:
        for name in f.keys():
            t = f.get_slice(name)
            n = 1
            for d in t.get_shape():
                n *= d
            total += n * {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
    return total


@pytest.mark.parametrize("model_id", ["signal-tiny", "signal-small"])
def test_weight_estimate_matches_the_built_models_weights(model_id):
    shape = memory.shape_of(model_id)
    measured = _file_bytes(models.resolve_model_path(model_id))  # stored as float32
    estimate = memory.weight_bytes(shape, "fp32")
    assert abs(estimate - measured) <= 0.2 * measured, (estimate, measured)
    loaded = models.load_model(model_id)
    in_memory = sum(p.numel() * p.element_size() for p in loaded.parameters())
    assert abs(estimate - in_memory) <= 0.2 * in_memory
    # At bf16 the same weights take half.
    assert memory.weight_bytes(shape, "bf16") == pytest.approx(estimate / 2, rel=0.01)


def test_signal_1b_estimate_matches_its_parameters_without_building_it():
    shape = memory.shape_of("signal-1b")
    params = models.model_info("signal-1b").param_count  # meta-device skeleton
    assert abs(memory.weight_bytes(shape, "bf16") - 2 * params) <= 0.2 * 2 * params
    assert not models._builtin_dir("signal-1b").exists()
    # nf4 packs the decoder's linear weights to ~4.1 bits: about a quarter of bf16.
    nf4 = memory.weight_bytes(shape, "bf16", "nf4")
    assert 0.25 < nf4 / memory.weight_bytes(shape, "bf16") < 0.35
    # Calibration point (bench/RESULTS.md, gpu_worker): 41.4 GiB peak at 16,384
    # tokens per micro-batch, LoRA r=16 on all projections, bf16, SDPA.
    need = memory.train_memory_bytes(shape, dtype="bf16", quantization=None, lora_r=16,
                                     targets=models.DEFAULT_TARGET_MODULES, tokens=16384)
    assert abs(need / 2**30 - 41.4) <= 0.2 * 41.4


@pytest.mark.parametrize("config, params", [
    # meta-llama/Llama-3.2-1B: 1,235,814,400 parameters
    (LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                 num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=64, tie_word_embeddings=True), 1_235_814_400),
    # meta-llama/Llama-2-7b-hf: 6,738,415,616
    (LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
     6_738_415_616),
])
def test_parameter_count_of_real_configs(config, params):
    shape = memory.ModelShape.from_config(config)
    assert shape.linear_params() + shape.other_params() == params
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        skeleton = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in skeleton.parameters()) == params


def test_activations_grow_with_tokens_dtype_and_eager_attention():
    shape = memory.shape_of("signal-small")
    per = memory.activation_bytes_per_token
    assert per(shape, "fp32") == pytest.approx(2 * per(shape, "bf16"), rel=0.05)
    assert per(shape, "fp32", eager_seq_len=2048) > 2 * per(shape, "fp32")
    kw = {"dtype": "bf16", "quantization": None, "lora_r": 8, "targets": ("q_proj",)}
    assert memory.train_memory_bytes(shape, tokens=2048, **kw) > memory.train_memory_bytes(
        shape, tokens=1024, **kw)


@pytest.mark.parametrize("text, gib", [("A100-80GB:2", 72), ("H100", 72), ("l4:1", 21.6),
                                       ("RTX4090-24GB", 21.6), ("Quantum9000", None)])
def test_gpu_config_hint(text, gib):
    got = memory.gpu_config_memory_bytes(text)
    assert (got is None) if gib is None else got == int(gib * 2**30)


@pytest.mark.parametrize("text", ["A100-80GB:x", "A100:0", "", "A100 80GB", "A100-GB"])
def test_malformed_gpu_config_is_a_validation_error(text):
    with pytest.raises(ValidationError, match="gpu_config"):
        memory.gpu_config_memory_bytes(text)
