"""Base models: the registry, the built-in offline models and their fingerprints.

Real runs name Hugging Face ids and load them with ``AutoModelForCausalLM`` /
``AutoTokenizer``. Machines without internet use the built-in models, which are
*built* locally (no download) into ordinary Hugging Face directories under
``$SIGNAL_HOME/models`` so that every consumer still goes through
``from_pretrained``. Built-in weights come from a counter-free, platform
independent generator (numpy PCG64 seeded per tensor name), so two machines
build bit-identical weights and agree on the fingerprint.

``signal-1b`` (Llama-3.2-1B's shapes) is built only on demand: nothing in the CPU
test suite resolves it. Its tensors are drawn in float32 on a thread pool and
stored in bfloat16 (as Llama-3.2-1B ships), so it builds in seconds on a
many-core box and its file is half the size.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from rewardsignal.errors import NotFoundError, ValidationError

# Names of config keys that describe the installation, not the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype",
                         "torch_dtype", "use_cache")

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj")


@dataclass(frozen=True)
class BuiltinSpec:
    """Shape of a built-in Llama-family model; its ``asdict`` is its identity."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    init_std: float
    seed: int
    format_version: int = 2
    # Added with signal-1b; at these defaults they are left out of a spec's
    # identity so the older built-ins keep their directories (and weights).
    tie_word_embeddings: bool = False
    weights_dtype: str = "float32"
    rope_theta: float = 10000.0


_SPEC_DEFAULTS = {"tie_word_embeddings": False, "weights_dtype": "float32", "rope_theta": 10000.0}


def _spec_identity(spec: BuiltinSpec) -> dict:
    return {k: v for k, v in asdict(spec).items()
            if not (k in _SPEC_DEFAULTS and v == _SPEC_DEFAULTS[k])}


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    # ~0.9M parameters: tests and the demo.
    "signal-tiny": BuiltinSpec(128, 352, 4, 4, 2, 512, 0.05, seed=1),
    # ~16M parameters: benchmarks where compute must dominate overhead.
    "signal-small": BuiltinSpec(384, 1024, 8, 6, 2, 1024, 0.04, seed=2),
    # ~0.97B parameters, Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32 heads,
    # 8 kv heads, MLP 8192, tied embeddings, rope theta 5e5) except the vocabulary:
    # it keeps the byte-level tokenizer (264 ids) so it stays offline, which drops
    # the real model's 262M embedding parameters. GPU benchmarks and GPU tests.
    # Format 3: float32 draws (not float64), stored as bfloat16.
    "signal-1b": BuiltinSpec(2048, 8192, 16, 32, 8, 4096, 0.02, seed=3, format_version=3,
                             tie_word_embeddings=True, weights_dtype="bfloat16",
                             rope_theta=500000.0),
}


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    builtin: bool
    param_count: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    default_target_modules: tuple[str, ...]

    def to_json(self) -> dict:
        d = asdict(self)
        d["default_target_modules"] = list(self.default_target_modules)
        return d


def signal_home() -> Path:
    return Path(os.environ.get("SIGNAL_HOME") or Path.home() / ".cache" / "rewardsignal")


def is_builtin(model_id: str) -> bool:
    return model_id in BUILTIN_MODELS


def _builtin_dir(model_id: str) -> Path:
    spec = BUILTIN_MODELS[model_id]
    digest = hashlib.sha256(json.dumps(_spec_identity(spec), sort_keys=True).encode()
                            ).hexdigest()[:12]
    return signal_home() / "models" / f"{model_id}-{digest}"


def resolve_model_path(model_id: str) -> Path:
    """Local directory of ``model_id``: built-ins are built on first use, a local
    path is used as is, anything else is a Hugging Face id fetched (or found in
    the cache) by ``huggingface_hub``."""
    if is_builtin(model_id):
        target = _builtin_dir(model_id)
        if not (target / "model.safetensors").exists():
            _build_builtin(model_id, target)
        elif not (target / _TOKENIZER_MARK).exists():
            _refresh_tokenizer(target)
        return target
    local = Path(model_id).expanduser()
    if local.is_dir() and (local / "config.json").exists():
        return local
    if not isinstance(model_id, str) or model_id.count("/") != 1:
        raise NotFoundError(
            f"unknown base model {model_id!r}: use a built-in ({', '.join(BUILTIN_MODELS)}), "
            "a Hugging Face id like 'org/name', or a local model directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]))
    except Exception as exc:  # network, auth, missing repo: all the same to the caller
        raise NotFoundError(f"cannot fetch base model {model_id!r} from the Hugging Face hub "
                            f"({type(exc).__name__}: {exc}); check the id and network, or "
                            "pre-download it into the HF cache") from exc


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _builtin_tensor(name: str, shape: tuple[int, ...], spec: BuiltinSpec) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    seed = int.from_bytes(hashlib.sha256(f"{spec.seed}:{name}".encode()).digest()[:8], "little")
    rng = np.random.Generator(np.random.PCG64(seed))
    if spec.format_version >= 3:
        # float32 draws are ~2.5x faster than float64 ones and as deterministic.
        out = rng.standard_normal(shape, dtype=np.float32)
        out *= np.float32(spec.init_std)
        return out
    return (rng.standard_normal(shape) * spec.init_std).astype(np.float32)


def builtin_config(model_id: str):
    from transformers import LlamaConfig

    spec = BUILTIN_MODELS[model_id]
    vocab = 256 + len(SPECIAL_TOKENS)
    # Only a non-default theta is passed, so older built-ins' config.json (part of
    # their fingerprint) stays byte for byte what it was.
    rope: dict[str, Any] = {} if spec.rope_theta == _SPEC_DEFAULTS["rope_theta"] else {
        "rope_theta": spec.rope_theta}
    return LlamaConfig(
        vocab_size=(vocab + 7) // 8 * 8, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=spec.tie_word_embeddings, **rope,
        initializer_range=spec.init_std, architectures=["LlamaForCausalLM"],
    )


def build_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast``: 256 byte tokens, no merges, the
    special tokens above, BOS added by ``tokenizer(text)``, and a ChatML-style
    chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord):
        vocab[ch] = len(vocab)
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # ``tokenizer(text)`` starts with <|bos|>, as the models are trained and
    # sampled (Llama tokenizers do the same).
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
        special_tokens=[("<|bos|>", vocab["<|bos|>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Present in a built-in's directory once its tokenizer adds BOS itself; older
# directories get the new tokenizer files in place (weights are untouched).
_TOKENIZER_MARK = ".tokenizer-adds-bos"


def _refresh_tokenizer(target: Path) -> None:
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / _TOKENIZER_MARK).exists():
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tok.", dir=target.parent))
        try:
            build_tokenizer().save_pretrained(tmp)
            for f in tmp.iterdir():
                os.replace(f, target / f.name)  # each file whole, never half-written
            (target / _TOKENIZER_MARK).touch()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _build_builtin(model_id: str, target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "model.safetensors").exists():  # another process built it meanwhile
            return
        spec = BUILTIN_MODELS[model_id]
        config = builtin_config(model_id)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
        if spec.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)  # the embedding matrix, saved once
        tensors = _generate_tensors(shapes, spec)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            config.save_pretrained(tmp)
            # Generation stops at <|eos|> and at the end of a chat turn, <|im_end|>.
            GenerationConfig(bos_token_id=1, eos_token_id=[2, SPECIAL_TOKENS.index("<|im_end|>")],
                             pad_token_id=0).save_pretrained(tmp)
            save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
            build_tokenizer().save_pretrained(tmp)
            (tmp / _TOKENIZER_MARK).touch()
            (tmp / "signal_builtin.json").write_text(
                json.dumps({"model_id": model_id, **asdict(spec)}, indent=2, sort_keys=True))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _generate_tensors(shapes: dict[str, tuple[int, ...]], spec: BuiltinSpec) -> dict:
    """Every tensor from its own seeded stream, on a thread pool (numpy releases
    the GIL while it fills an array): each tensor depends only on its name, so
    the result does not depend on the number of threads or their order."""
    import torch

    dtype = getattr(torch, spec.weights_dtype)

    def one(name: str):
        return name, torch.from_numpy(_builtin_tensor(name, shapes[name], spec)).to(dtype)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return dict(pool.map(one, sorted(shapes)))


def load_tokenizer(model_id: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model_id))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def attention_for(device: str) -> str:
    """Eager attention on CPU: the numerics rule is checked there to 1e-5 and
    eager gives the same float32 results whatever the batch's shape and padding,
    which a fused kernel's tiling need not. PyTorch's SDPA on CUDA: fused
    (flash / memory-efficient) kernels, several times faster on long sequences
    and without the T x T attention matrix in memory."""
    return "sdpa" if str(device).startswith("cuda") else "eager"


def load_model(model_id: str, *, dtype=None, device: str = "cpu",
               quantization: str | None = None, device_map: str | None = None):
    """The frozen base model through ``from_pretrained``, its attention chosen
    by ``attention_for(device)``. ``quantization`` ("nf4" | "int8") loads the
    linear weights through bitsandbytes (CUDA only); ``dtype`` is then the dtype
    of everything else and of the matmuls. ``device_map="auto"`` (CUDA only)
    spreads the layers evenly over every visible GPU through accelerate, for a
    model larger than one GPU: inputs go to the input embedding's GPU, and the
    logits come out on the output layer's."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = dtype or torch.float32
    extra: dict[str, Any] = {}
    for needs_cuda, what in ((quantization, f"a {quantization} base (bitsandbytes)"),
                             (device_map, f"device_map={device_map!r}")):
        if needs_cuda is not None and not str(device).startswith("cuda"):
            raise ValidationError(f"{what} needs a CUDA device, not {device}")
    if device_map is not None:
        # Only the GPUs: what does not fit them is an error, not layers quietly
        # offloaded to the CPU or disk.
        extra["device_map"] = device_map
        extra["max_memory"] = {i: torch.cuda.mem_get_info(i)[0]
                               for i in range(torch.cuda.device_count())}
    elif quantization is not None:
        # Quantized weights are made on the device while loading; they cannot be
        # moved afterwards with ``.to``.
        extra["device_map"] = {"": torch.device(device).index or 0}
    if quantization is not None:
        from rewardsignal.precision import bnb_config

        extra["quantization_config"] = bnb_config(quantization, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_id), dtype=dtype, attn_implementation=attention_for(device),
        **extra)
    model.requires_grad_(False)
    model.eval()
    placed = set(getattr(model, "hf_device_map", {}).values())
    if device_map is not None and not all(isinstance(d, int) for d in placed):
        raise ValidationError(f"{model_id} does not fit this worker's GPUs (accelerate placed "
                              f"part of it on {sorted(map(str, placed))})")
    if "device_map" in extra:
        return model
    # transformers wraps ``to`` in a decorator whose stub types its first argument
    # as the model; a device string is what it takes at run time.
    return model.to(device)  # type: ignore[arg-type]


@lru_cache(maxsize=16)
def _fingerprint_cached(path: str, stamp: tuple) -> str:
    from safetensors import safe_open

    root = Path(path)
    h = hashlib.sha256()
    cfg = json.loads((root / "config.json").read_text())
    for key in _VOLATILE_CONFIG_KEYS:
        cfg.pop(key, None)
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def fingerprint(model_id: str) -> str:
    """Hash of the model's config and weights; two parties agree on it iff they
    compute on the same base."""
    root = resolve_model_path(model_id)
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                  for p in sorted(root.glob("*.safetensors")))
    return _fingerprint_cached(str(root), stamp)


def model_config(model_id: str):
    """The model's transformers config, read without loading any weights."""
    from transformers import AutoConfig

    if is_builtin(model_id):
        return builtin_config(model_id)
    return AutoConfig.from_pretrained(resolve_model_path(model_id))


@lru_cache(maxsize=16)
def model_info(model_id: str) -> ModelInfo:
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(model_id)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linear_names = {n.rsplit(".", 1)[-1] for n, m in skeleton.named_modules()
                    if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    targets = tuple(t for t in DEFAULT_TARGET_MODULES if t in linear_names) or tuple(
        sorted(linear_names))
    return ModelInfo(
        model_id=model_id, builtin=is_builtin(model_id),
        param_count=sum(p.numel() for p in skeleton.parameters()),
        num_layers=int(getattr(config, "num_hidden_layers", 0)),
        hidden_size=int(getattr(config, "hidden_size", 0)),
        vocab_size=int(config.vocab_size), default_target_modules=targets)


def is_available_locally(model_id: str) -> bool:
    """Whether ``model_info`` can answer without downloading anything: a
    built-in, a local directory, or a hub id whose config is in the HF cache."""
    if is_builtin(model_id) or (Path(model_id).expanduser() / "config.json").is_file():
        return True
    if model_id.count("/") != 1:
        return False
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def model_source(model_id: str) -> str:
    """``builtin`` | ``local`` (a directory) | ``hub`` (a Hugging Face id)."""
    if is_builtin(model_id):
        return "builtin"
    return "local" if Path(model_id).expanduser().is_dir() else "hub"


def list_models() -> list[dict]:
    return [model_info(m).to_json() for m in BUILTIN_MODELS]
