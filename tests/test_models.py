import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rewardsignal import memory, models


def _build_in_fresh_home(tmp_path, name):
    """Build signal-tiny in a separate process with its own SIGNAL_HOME, as a
    second machine would, and return (directory, fingerprint)."""
    env = dict(os.environ, SIGNAL_HOME=str(tmp_path / name))
    code = ("from rewardsignal import models; p = models.resolve_model_path('signal-tiny'); "
            "print(p); print(models.fingerprint('signal-tiny'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    return out[-2], out[-1]


def test_builtin_build_is_bit_identical_across_builds(tmp_path, tiny_path):
    dir_a, fp_a = _build_in_fresh_home(tmp_path, "a")
    dir_b, fp_b = _build_in_fresh_home(tmp_path, "b")
    assert dir_a != dir_b
    assert fp_a == fp_b == models.fingerprint("signal-tiny")
    wa = load_file(os.path.join(dir_a, "model.safetensors"))
    wb = load_file(os.path.join(dir_b, "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fingerprint_changes_with_weights(tmp_path, tiny_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_path, copy)
    assert models.fingerprint(str(copy)) == models.fingerprint("signal-tiny")
    w = load_file(copy / "model.safetensors")
    w["model.norm.weight"][0] += 1e-3
    from safetensors.torch import save_file

    save_file(w, copy / "model.safetensors")
    assert models.fingerprint(str(copy)) != models.fingerprint("signal-tiny")


def test_tiny_loads_through_from_pretrained(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tok = AutoTokenizer.from_pretrained(tiny_path)
    assert isinstance(tok, PreTrainedTokenizerBase)
    assert model.config.model_type == "llama"
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n < 1.5e6
    ids = tok("héllo, world", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "héllo, world"
    assert len(ids) == len("héllo, world".encode())  # one token per byte
    out = model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), model.config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_chat_template_and_special_tokens(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert tokenizer.eos_token == "<|eos|>" and tokenizer.bos_token == "<|bos|>"


def test_model_info_and_memory_estimate():
    tiny, small = models.model_info("signal-tiny"), models.model_info("signal-small")
    assert 10e6 <= small.param_count <= 30e6
    assert tiny.default_target_modules[:2] == ("q_proj", "k_proj")
    fp32 = memory.estimate_train_memory_bytes("signal-small", dtype="fp32")
    bf16 = memory.estimate_train_memory_bytes("signal-small", dtype="bf16")
    nf4 = memory.estimate_train_memory_bytes("signal-small", dtype="bf16", quantization="nf4")
    assert fp32 > bf16 > small.param_count * 2
    assert bf16 > nf4 > small.param_count * 0.5
    assert memory.estimate_train_memory_bytes("signal-small", tokens=8192) > bf16


def test_unknown_model_id_is_a_clear_error():
    import pytest

    from rewardsignal.errors import NotFoundError

    with pytest.raises(NotFoundError, match="unknown base model"):
        models.resolve_model_path("no-such-model")


def test_builtin_dir_is_an_ordinary_hf_directory(tiny_path):
    names = set(os.listdir(tiny_path))
    assert {"config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert json.loads((tiny_path / "config.json").read_text())["model_type"] == "llama"


def test_signal_1b_has_llama_3_2_1b_shapes_without_being_built():
    cfg = models.builtin_config("signal-1b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size) == (2048, 16, 32, 8, 8192)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 264  # byte-level tokenizer, offline
    # Llama-3.2-1B has 1.236B parameters, 262.7M of them its 128,256 x 2048 embedding;
    # ours has the same blocks and a 264-row embedding.
    info = models.model_info("signal-1b")
    assert info.param_count == 1_235_814_400 - 128_256 * 2048 + 264 * 2048
    assert not models._builtin_dir("signal-1b").exists()  # only built on demand


def test_format_3_weights_depend_only_on_names():
    spec = models.BUILTIN_MODELS["signal-1b"]
    shapes = {"a.weight": (64, 32), "b.weight": (16,), "c.norm.weight": (8,)}
    first = models._generate_tensors(shapes, spec)
    again = models._generate_tensors(dict(reversed(list(shapes.items()))), spec)
    assert all(torch.equal(first[k], again[k]) for k in shapes)
    assert first["a.weight"].dtype == torch.bfloat16
    assert torch.equal(first["c.norm.weight"], torch.ones(8, dtype=torch.bfloat16))
    assert 0.015 < float(first["a.weight"].float().std()) < 0.025
    assert not torch.equal(first["a.weight"][:16, 0], first["b.weight"])


def test_builtin_tokenizer_adds_bos_the_usual_way(tiny_path):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    ids = tok("The meaning of life is")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert ids[1:] == tok.encode("The meaning of life is", add_special_tokens=False)


def test_an_older_builtin_directory_gets_the_bos_tokenizer_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGNAL_HOME", str(tmp_path))
    path = models.resolve_model_path("signal-tiny")
    # As an earlier build left it: no BOS post-processor, no mark.
    tok_file = path / "tokenizer.json"
    tok_file.write_text(json.dumps({**json.loads(tok_file.read_text()), "post_processor": None}))
    (path / models._TOKENIZER_MARK).unlink()
    assert AutoTokenizer.from_pretrained(path)("hi")["input_ids"][0] != 1
    weights = (path / "model.safetensors").stat().st_mtime_ns

    assert models.resolve_model_path("signal-tiny") == path

    assert AutoTokenizer.from_pretrained(path)("hi")["input_ids"][0] == 1
    assert (path / "model.safetensors").stat().st_mtime_ns == weights  # weights untouched
