"""``sample`` tasks on vLLM (``signal-worker --sampler vllm``; the ``vllm`` extra).

One vLLM engine per base model, in the worker process, beside the training
engine: it takes ``--vllm-memory`` of the GPU (weights and KV cache). The run's
adapter for the version a task asks for is written as a PEFT adapter folder and
loaded as a LoRA request, one id per (run, version).

The results keep the built-in path's meaning (``worker.sampling``): one request
per sequence, seeded by that sequence's ``row_seed``; a sampled token's logprob
is under the model's whole output layer before truncation (vLLM's
``raw_logprobs``), which is the built-in promise at temperature 0 and 1, so only
those temperatures come here (others, and quantized bases, take the built-in
path); sampling never lands past the tokenizer's vocabulary; generation stops
at the same stop ids (``ignore_eos``: the task's ids are the whole list) and
stop strings, and a row's text ends before the stop string that ended it.

Reproducibility differs: the built-in path gives a seeded sequence the same
tokens on the same device and dtype whatever batch it is in; vLLM seeds each
sequence too, but its kernels need not give bit-identical logits across batch
compositions or versions, so a seeded sample can differ when the batch around
it does. Either path's logprobs are checked the same way (``trust.sample_check``).

Anything vLLM raises (it is missing, it cannot start, a generate fails) is said
once and the worker samples on the built-in path from then on.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rewardsignal.errors import ValidationError
from rewardsignal.lora import LoraSpec, adapter_config_json
from rewardsignal.precision import Precision
from rewardsignal.worker.sampling import SampleParams, sample_text

log = logging.getLogger("signal.worker")

# LoRA ranks vLLM's kernels take; its max_lora_rank is the smallest that holds the run's.
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
_KEEP_ADAPTERS = 4
# The longest prompt + generation vLLM is set up for (its KV cache is sized for
# it): a model's whole context (128k for many) would not fit the GPU share. A
# task that needs more samples on the built-in path.
MAX_MODEL_LEN = 8192
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def model_len(context: int) -> int:
    """The sequence length a vLLM engine is set up for, for a model of ``context``."""
    return min(context, MAX_MODEL_LEN)


def unsupported(precision: Precision, params: SampleParams, longest: int,
                context: int) -> str | None:
    """Why a task (its longest prompt ``longest`` tokens, a model of ``context``
    positions) cannot sample on vLLM with the built-in path's meaning, or None."""
    if longest + params.max_tokens > model_len(context):
        return f"{longest} + {params.max_tokens} tokens exceed {model_len(context)}"
    if precision.quantization is not None:
        return f"a {precision.quantization} base"
    if params.temperature not in (0, 1):
        return (f"temperature {params.temperature:g} (a sampled token's logprob is "
                "log_softmax(logits / T) on the built-in path only)")
    return None


class VllmSampler:
    def __init__(self, memory_fraction: float) -> None:
        self.memory_fraction = memory_fraction
        self.broken: str | None = None  # why vLLM is off for this process
        self._llm: Any = None
        self._llm_key: tuple[str, str, int] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="signal-vllm-adapters-"))
        self._adapters: OrderedDict[tuple[str, int], tuple[int, Path]] = OrderedDict()
        self._next_id = 1

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def give_up(self, exc: BaseException) -> None:
        self.broken = f"{type(exc).__name__}: {exc}"
        log.warning("vLLM sampling is off for this worker (%s); sample tasks run on the "
                    "built-in path", self.broken)
        self._llm = None

    # -- engine and adapters -------------------------------------------------------------
    def _engine(self, model_path: str, dtype: str, rank: int, context: int):
        need = next((r for r in _VLLM_RANKS if r >= rank), rank)
        key = (model_path, dtype, need)
        if self._llm is None or self._llm_key is None or self._llm_key[:2] != key[:2] \
                or self._llm_key[2] < need:
            from vllm import LLM

            self._llm = None  # the old engine's memory goes before the new one asks
            self._adapters.clear()
            # vLLM's engine checks that its share is free on the GPU: the training
            # engine's cached blocks go back to the driver first.
            torch.cuda.empty_cache()
            self._llm = LLM(model=model_path, dtype=_DTYPES[dtype], enable_lora=True,
                            max_lora_rank=need, max_loras=2, max_model_len=model_len(context),
                            gpu_memory_utilization=self.memory_fraction,
                            logprobs_mode="raw_logprobs", seed=0)
            self._llm_key = key
        return self._llm

    def _adapter(self, run_id: str, version: int, spec: LoraSpec, base_model: str,
                 adapter: dict[str, torch.Tensor]):
        from vllm.lora.request import LoRARequest

        got = self._adapters.get((run_id, version))
        if got is None:
            lora_id, self._next_id = self._next_id, self._next_id + 1
            path = self._dir / f"{lora_id}"
            path.mkdir()
            (path / "adapter_config.json").write_text(
                json.dumps(adapter_config_json(spec, base_model)))
            save_file({k: v.detach().float().cpu().contiguous() for k, v in adapter.items()},
                      str(path / "adapter_model.safetensors"))
            got = self._adapters[(run_id, version)] = (lora_id, path)
            while len(self._adapters) > _KEEP_ADAPTERS:
                _, (_, old) = self._adapters.popitem(last=False)
                shutil.rmtree(old, ignore_errors=True)
        self._adapters.move_to_end((run_id, version))
        lora_id, path = got
        return LoRARequest(f"{run_id}@v{version}", lora_id, str(path))

    # -- sampling --------------------------------------------------------------------------
    def generate(self, *, model_path: str, base_model: str, dtype: str, spec: LoraSpec,
                 run_id: str, version: int, adapter: dict[str, torch.Tensor],
                 tokenizer: Any, output_size: int, context: int, prompts: list[list[int]],
                 seeds: list[list[int]], params: SampleParams
                 ) -> tuple[list[list[dict]], list | None]:
        """What ``worker.sampling.generate`` returns, computed by vLLM."""
        from vllm import SamplingParams

        llm = self._engine(model_path, dtype, spec.r, context)
        vocab_size = len(tokenizer)
        lora = self._adapter(run_id, version, spec, base_model, adapter)
        allowed = list(range(vocab_size)) if output_size > vocab_size else None
        plan = [(p, s, i) for p, ss in enumerate(seeds) for i, s in enumerate(ss)]
        requests = [{"prompt_token_ids": prompts[p]} for p, _, _ in plan]
        sampling = [SamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_tokens,
            seed=seed, stop=list(params.stop_strings) or None,
            stop_token_ids=list(params.stop_ids), ignore_eos=True, logprobs=0,
            prompt_logprobs=0 if params.prompt_logprobs and i == 0 else None,
            # Stop strings are matched against text with special tokens kept, as the
            # built-in path matches them; the text returned is made as there.
            allowed_token_ids=allowed, skip_special_tokens=False) for _, seed, i in plan]
        outs = llm.generate(requests, sampling, lora_request=lora, use_tqdm=False)
        samples: list[list[dict]] = [[] for _ in prompts]
        prompt_lps: list | None = [None] * len(prompts) if params.prompt_logprobs else None
        for (p, _, i), out in zip(plan, outs, strict=True):
            seq = out.outputs[0]
            if seq.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM ended a sequence with {seq.finish_reason!r}")
            tokens = list(seq.token_ids)
            samples[p].append({
                "tokens": tokens,
                "logprobs": [float(lp[t].logprob) for t, lp in zip(tokens, seq.logprobs,
                                                                    strict=True)],
                "text": sample_text(tokens, tokenizer, params),
                "stop_reason": "length" if seq.finish_reason == "length" else "stop"})
            if prompt_lps is not None and i == 0:
                prompt_lps[p] = [None] + [float(d[t].logprob) for t, d in
                                          zip(prompts[p][1:], out.prompt_logprobs[1:],
                                              strict=True)]
        return samples, prompt_lps


def make_sampler(sampler: str, device: torch.device, device_map: str | None,
                 vllm_memory: float) -> VllmSampler | None:
    """The worker's vLLM sampler for ``--sampler vllm`` (None for the built-in
    one), or a ``ValidationError`` saying why this worker cannot run it."""
    if sampler != "vllm":
        return None
    import importlib.util

    if device.type != "cuda":
        raise ValidationError(f"--sampler vllm needs a CUDA device, not {device}")
    if device_map is not None or (device.index or 0) != 0:
        # vLLM runs on the first GPU the process sees, on one GPU.
        raise ValidationError("--sampler vllm runs on a worker of one GPU: pick it with "
                              "CUDA_VISIBLE_DEVICES or --gpus, not cuda:N or --device-map")
    if not 0 < vllm_memory < 1:
        raise ValidationError(f"--vllm-memory is the GPU share vLLM takes, in (0, 1); got "
                              f"{vllm_memory:g}")
    if importlib.util.find_spec("vllm") is None:
        raise ValidationError("--sampler vllm: vLLM is not installed "
                              "(pip install 'rewardsignal[vllm]')")
    return VllmSampler(vllm_memory)
