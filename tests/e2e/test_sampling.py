"""Sampling through the fleet, with a real coordinator and workers: seeded
results do not depend on how many workers share a request, greedy equals
``generate``, stop strings end sequences, logprobs equal a reference forward
pass, ``compute_logprobs`` too, every bad input is a 4xx that queues nothing,
and the RL example's reward rises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from harness import start_coordinator, start_worker, wait_workers
from reference import ReferenceTrainer

from rewardsignal import SignalClient
from rewardsignal.data import sample_examples
from rewardsignal.errors import NotFoundError, ValidationError
from rewardsignal.lora import LoraSpec
from rewardsignal.protocol import tensors_from_bytes

pytestmark = pytest.mark.slow
PROMPTS = ["The meaning of life is", "Once upon a time", "2+2=", "Hello"]


def _weights(client, run, version):
    return tensors_from_bytes(client._loop.run(client._target._http(
        "GET", f"/v1/runs/{run.run_id}/weights/{version}", raw=True)))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    data = tmp_path_factory.mktemp("sampling") / "data"
    coord, url = start_coordinator(data, "--keep-last", "2")
    workers = [start_worker(url, f"w{i}") for i in range(3)]
    client = SignalClient(base_url=url)
    wait_workers(url, 3)
    run = client.create_run(base_model="signal-tiny", lora_r=4, learning_rate=2e-2, seed=5)
    for _ in range(2):  # a trained adapter (B != 0), so LoRA changes the outputs
        run.forward_backward(sample_examples()[:16])
        run.optim_step()
    info = run.info()
    spec = LoraSpec(r=info["lora_r"], alpha=info["lora_alpha"],
                    target_modules=tuple(info["lora_target_modules"]), seed=info["seed"])
    ref = ReferenceTrainer("signal-tiny", spec, _weights(client, run, info["version"]), lr=0)
    ref.model.eval()
    yield client, run, ref, workers
    client.close()
    for w in workers:
        w.stop()
    coord.stop()


def _ref_logprobs(ref, tokens: list[int]) -> list[float]:
    with torch.no_grad():
        logits = ref.model(input_ids=torch.tensor([tokens])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[i, t]) for i, t in enumerate(tokens[1:])]


def test_greedy_equals_generate_and_logprobs_equal_a_forward_pass(cluster):
    client, run, ref, _ = cluster
    res = run.sample(prompts=PROMPTS[:1], temperature=0, max_tokens=24)
    prompt = res["prompt_tokens"][0]
    (seq,) = res["sequences"][0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        gen = ref.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=24, do_sample=False, pad_token_id=0,
                                 eos_token_id=ref.model.generation_config.eos_token_id)
    assert seq["tokens"] == gen[0, len(prompt):].tolist()
    want = _ref_logprobs(ref, prompt + seq["tokens"])[len(prompt) - 1:]
    assert max(abs(a - b) for a, b in zip(seq["logprobs"], want, strict=True)) <= 1e-5
    assert res["outputs"][0] == seq["text"] and res["tokens"][0] == seq["tokens"]


def test_seeded_sampling_is_the_same_on_one_and_on_three_workers(cluster):
    client, run, ref, workers = cluster
    args = dict(prompts=PROMPTS * 20, num_samples=4, max_tokens=12, temperature=1.0, seed=11)
    three = run.sample(**args)  # 80 prompts x 4: five tasks over three workers
    assert len(three["sequences"]) == 80 and all(len(s) == 4 for s in three["sequences"])
    seqs = [s for group in three["sequences"] for s in group]
    assert len({tuple(s["tokens"]) for s in seqs}) > 40  # samples differ from each other
    for p, s in ((0, three["sequences"][0][2]), (3, three["sequences"][3][1])):
        want = _ref_logprobs(ref, three["prompt_tokens"][p] + s["tokens"])
        got = s["logprobs"]
        assert max(abs(a - b) for a, b in zip(got, want[-len(got):], strict=True)) <= 1e-5
    workers[1].stop()
    workers[2].stop()
    one = run.sample(**args)
    assert one["sequences"] == three["sequences"]
    other = run.sample(**{**args, "seed": 12})
    assert other["sequences"] != three["sequences"]


def test_stop_strings_and_ids_end_sequences(cluster):
    client, run, _, _ = cluster
    free = run.sample(prompts=PROMPTS[2:3], temperature=0, max_tokens=16)
    tokens = free["sequences"][0][0]["tokens"]
    text = free["sequences"][0][0]["text"]
    stop = text[3:5]
    assert len(stop) == 2 and free["sequences"][0][0]["stop_reason"] == "length"
    cut = run.sample(prompts=PROMPTS[2:3], temperature=0, max_tokens=16, stop=[stop])
    (seq,) = cut["sequences"][0]
    assert seq["stop_reason"] == "stop" and seq["text"] == text[:text.find(stop)]
    assert seq["tokens"] == tokens[:len(seq["tokens"])] and len(seq["tokens"]) < 16
    by_id = run.sample(prompts=PROMPTS[2:3], temperature=0, max_tokens=16, stop=[tokens[2]])
    (seq,) = by_id["sequences"][0]
    assert seq["stop_reason"] == "stop" and seq["tokens"] == tokens[:tokens.index(tokens[2]) + 1]


def test_compute_logprobs_and_prompt_logprobs_equal_a_forward_pass(cluster):
    client, run, ref, _ = cluster
    seqs = [[1, 40, 41, 42, 43], [1, 70], [5]]
    got = run.compute_logprobs(seqs)
    assert got[2] == [None] and got[1][0] is None and got[0][0] is None
    for s, lp in zip(seqs[:2], got[:2], strict=True):
        assert max(abs(a - b) for a, b in zip(lp[1:], _ref_logprobs(ref, s), strict=True)) <= 1e-5
    res = run.sample(prompts=PROMPTS[:2], max_tokens=4, include_prompt_logprobs=True, seed=1)
    for prompt, plp in zip(res["prompt_tokens"], res["prompt_logprobs"], strict=True):
        assert plp[0] is None
        want = _ref_logprobs(ref, prompt)
        assert max(abs(a - b) for a, b in zip(plp[1:], want, strict=True)) <= 1e-5


def test_importance_ratio_is_one_on_logprobs_from_sample(cluster):
    """Logprobs from ``sample`` at temperature 1 are the model's own, so on the
    same version ``importance_sampling``'s ratio is 1 and its loss equals the
    plain policy-gradient loss, -sum(advantage x weight) / sum(weight)."""
    client, run, _, _ = cluster
    res = run.sample(prompts=PROMPTS[:2], num_samples=2, max_tokens=8, temperature=1.0, seed=3)
    batch, expected, weight = [], 0.0, 0.0
    for k, (prompt, group) in enumerate(zip(res["prompt_tokens"], res["sequences"],
                                            strict=True)):
        for j, seq in enumerate(group):
            tokens, n_prompt = prompt + seq["tokens"], len(prompt) - 1
            adv = [0.0] * n_prompt + [0.5 * (k + 1) - j] * len(seq["tokens"])
            w = [0.0] * n_prompt + [1.0] * len(seq["tokens"])
            batch.append({"model_input": tokens[:-1], "loss_fn_inputs": {
                "target_tokens": tokens[1:], "weights": w, "advantages": adv,
                "logprobs": [0.0] * n_prompt + seq["logprobs"]}})
            expected -= sum(a * x for a, x in zip(adv, w, strict=True))
            weight += sum(w)
    out = run.forward(batch, loss_fn="importance_sampling")
    assert out["loss"] == pytest.approx(expected / weight, rel=1e-4, abs=1e-6)


def test_bad_sampling_requests_are_refused_and_queue_nothing(cluster):
    client, run, _, _ = cluster
    bad = [dict(prompts=["x"], num_samples=0), dict(prompts=["x"], num_samples=1000),
           dict(prompts=["x"], max_tokens=100_000), dict(prompts=[""]),
           dict(prompts=["x"], stop=["s"] * 17), dict(prompts=["x"], stop=[10**9]),
           dict(prompts=["x"] * 256, num_samples=128, max_tokens=64),
           dict(prompts=["x"], version=99)]
    for kw in bad:
        with pytest.raises(ValidationError):
            run.sample(**kw)
    with pytest.raises(NotFoundError):  # keep-last 2: version 0 was pruned
        run.sample(prompts=["x"], version=0)
    with pytest.raises(ValidationError):
        run.compute_logprobs([[]])
    assert client.status()["tasks"] == {"pending": 0, "leased": 0}


def test_the_rl_example_raises_its_reward(cluster):
    client, _, _, _ = cluster
    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    import rl_loop

    curve = rl_loop.train(client, steps=8, log=lambda _: None)
    assert sum(curve[-3:]) / 3 > 3 * sum(curve[:2]) / 2 and curve[-1] > 0.2, curve
