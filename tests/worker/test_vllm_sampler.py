"""``--sampler vllm``: what the worker asks vLLM for and how it reads the answer,
against a stand-in of vLLM's Python API (``LLM``, ``SamplingParams``,
``LoRARequest``) written here; vLLM itself needs a CUDA GPU. A failing vLLM
turns itself off and the built-in path answers the same task."""

from __future__ import annotations

import json
import logging
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from rewardsignal.lora import LoraSpec
from rewardsignal.precision import Precision
from rewardsignal.worker.sampling import SampleParams

_FAKE = '''
class LogprobEntry:
    def __init__(self, logprob):
        self.logprob = logprob

class Sequence:
    def __init__(self, token_ids, logprobs, text, finish_reason):
        self.token_ids, self.logprobs = token_ids, logprobs
        self.text, self.finish_reason = text, finish_reason

class RequestOutput:
    def __init__(self, outputs, prompt_logprobs):
        self.outputs, self.prompt_logprobs = outputs, prompt_logprobs

class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)

class LLM:
    made = []
    fail = None

    def __init__(self, **kw):
        if LLM.fail:
            raise RuntimeError(LLM.fail)
        self.kw, self.calls = kw, []
        LLM.made.append(self)

    def generate(self, requests, params, lora_request=None, use_tqdm=True):
        self.calls.append((requests, params, lora_request))
        out = []
        for r, p in zip(requests, params):
            toks = [p.seed % 100, 7]
            lps = [{t: LogprobEntry(-0.25 * (j + 1))} for j, t in enumerate(toks)]
            plp = None
            if p.prompt_logprobs is not None:
                ids = r["prompt_token_ids"]
                plp = [None] + [{t: LogprobEntry(-1.0 - j)} for j, t in enumerate(ids[1:])]
            out.append(RequestOutput([Sequence(toks, lps, f"text{p.seed}", "stop")], plp))
        return out
'''

_LORA = '''
class LoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    pkg = tmp_path / "fakes" / "vllm"
    (pkg / "lora").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(_FAKE))
    (pkg / "lora" / "__init__.py").write_text("")
    (pkg / "lora" / "request.py").write_text(textwrap.dedent(_LORA))
    monkeypatch.syspath_prepend(str(tmp_path / "fakes"))
    import sys

    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    import vllm

    yield vllm
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        sys.modules.pop(name, None)


SPEC = LoraSpec(r=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
ADAPTER = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((4, 8), 0.5),
           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4)}


def _params(**kw) -> SampleParams:
    return SampleParams(**{"max_tokens": 5, "temperature": 1.0, "top_k": 0,
                           "stop_ids": (2, 9), "stop_strings": ("END",), **kw})


class _Tokenizer:
    """260 ids; a token decodes to its number, and id 99 to the stop string."""

    def __len__(self) -> int:
        return 260

    def decode(self, ids, skip_special_tokens=True):
        return " ".join("END" if i == 99 else str(i) for i in ids)


def _generate(sampler, version=3, **kw):
    return sampler.generate(
        model_path="/models/base", base_model="base", dtype="bf16", spec=SPEC, run_id="run-1",
        version=version, adapter=ADAPTER, tokenizer=_Tokenizer(), output_size=264,
        context=2048, prompts=[[1, 2, 3], [4, 5]], seeds=[[11, 12], [99, 14]],
        params=_params(**kw))


def test_each_sequence_is_one_seeded_request_on_the_runs_adapter(fake_vllm):
    from rewardsignal.worker.vllm_sampler import VllmSampler

    sampler = VllmSampler(0.3)
    try:
        samples, prompt_lps = _generate(sampler, prompt_logprobs=True)
        (llm,) = fake_vllm.LLM.made
        assert llm.kw == {"model": "/models/base", "dtype": "bfloat16", "enable_lora": True,
                          "max_lora_rank": 8, "max_loras": 2, "max_model_len": 2048,
                          "gpu_memory_utilization": 0.3, "logprobs_mode": "raw_logprobs",
                          "seed": 0}
        ((requests, params, lora),) = llm.calls
        assert [r["prompt_token_ids"] for r in requests] == [[1, 2, 3]] * 2 + [[4, 5]] * 2
        assert [p.seed for p in params] == [11, 12, 99, 14]
        p = params[0]
        assert (p.n, p.temperature, p.top_k, p.max_tokens) == (1, 1.0, -1, 5)
        assert (p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == (["END"], [2, 9], True, 0)
        assert p.allowed_token_ids == list(range(260))  # never past the tokenizer's vocabulary
        assert p.skip_special_tokens is False  # stop strings see special tokens, as built in
        assert [q.prompt_logprobs for q in params] == [0, None, 0, None]
        # The adapter for the version asked, as a PEFT folder.
        with open(f"{lora.lora_path}/adapter_config.json") as f:
            config = json.load(f)
        assert config["r"] == 4 and config["lora_alpha"] == 8.0
        saved = load_file(f"{lora.lora_path}/adapter_model.safetensors")
        assert saved.keys() == ADAPTER.keys()
        assert all(torch.equal(saved[k], ADAPTER[k]) for k in ADAPTER)
        # Read back as the built-in path answers.
        assert samples[0][1] == {"tokens": [12, 7], "logprobs": [-0.25, -0.5],
                                 "text": "12 7", "stop_reason": "stop"}
        assert [s["tokens"][0] for group in samples for s in group] == [11, 12, 99, 14]
        # The text is made as the built-in path makes it: ending before the stop string.
        assert samples[1][0]["text"] == ""
        assert prompt_lps == [[None, -1.0, -2.0], [None, -1.0]]
        # One LoRA id per (run, version); old adapter folders go.
        assert _generate_lora(sampler, 3).lora_int_id == lora.lora_int_id
        assert _generate_lora(sampler, 4).lora_int_id != lora.lora_int_id
        for v in range(5, 10):
            _generate_lora(sampler, v)
        assert not (sampler._dir / str(lora.lora_int_id)).exists()
        assert len(fake_vllm.LLM.made) == 1  # one engine for the base
    finally:
        sampler.close()


def _generate_lora(sampler, version):
    _generate(sampler, version=version)
    return sampler._llm.calls[-1][2]


def test_what_keeps_the_built_in_meaning_only_there():
    from rewardsignal.worker.vllm_sampler import unsupported

    def why(precision=Precision(), longest=100, context=4096, **kw):
        return unsupported(precision, _params(**kw), longest, context)

    assert why(temperature=1.0) is None and why(temperature=0.0) is None
    assert "temperature 0.7" in why(temperature=0.7)
    assert "nf4" in why(Precision("bf16", "nf4"))
    assert why(longest=4091) is None and why(longest=4092) == "4092 + 5 tokens exceed 4096"
    assert why(longest=8188, context=131072) == "8188 + 5 tokens exceed 8192"  # vLLM's cap


def test_a_failing_vllm_turns_off_and_the_built_in_path_answers(fake_vllm, caplog):
    """The worker's own sample path, with vLLM failing to start: the task's
    result is the built-in one, the failure is said once, and vLLM is not
    tried again."""
    from rewardsignal.models import model_info
    from rewardsignal.worker.loop import Worker, WorkerConfig
    from rewardsignal.worker.vllm_sampler import VllmSampler

    worker = Worker(WorkerConfig(coordinator="http://127.0.0.1:1", device="cpu"))
    spec = LoraSpec(r=2, alpha=4.0, target_modules=model_info("signal-tiny")
                    .default_target_modules)
    model, _ = worker.engine._peft_model("signal-tiny", spec, Precision())
    adapter = {k: v.detach().clone() for k, v in
               worker.engine._lora_params(model, next(iter(model.peft_config))).items()}
    task = {"run_id": "run-1", "version": 0, "lora": spec.to_json(), "base_model": "signal-tiny",
            "base_dtype": "auto"}
    payload = {"prompt_tokens": [[5, 6, 7]], "num_samples": 2, "max_tokens": 4,
               "temperature": 1.0, "seed": 3}
    builtin = worker._sample(model, "signal-tiny", payload, task, adapter)
    assert len(builtin["outputs"]) == 2 and builtin["outputs"][0]["tokens"]
    worker.vllm = VllmSampler(0.3)
    fake_vllm.LLM.fail = "no GPU memory left"
    try:
        with caplog.at_level(logging.WARNING, logger="signal.worker"):
            first = worker._sample(model, "signal-tiny", payload, task, adapter)
            again = worker._sample(model, "signal-tiny", payload, task, adapter)
    finally:
        fake_vllm.LLM.fail = None
        worker.vllm.close()
    assert first == again == builtin
    assert "RuntimeError: no GPU memory left" in worker.vllm.broken
    assert sum("vLLM sampling is off" in r.getMessage() for r in caplog.records) == 1
    assert not fake_vllm.LLM.made  # it never started
