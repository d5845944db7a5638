"""The unmodified ``tinker`` SDK drives a Signal coordinator and real workers.

One cluster for the module: first one worker, then three. Weights after
``forward_backward`` + ``optim_step`` through the SDK equal plain PEFT +
torch AdamW in one process with the SUM loss and the same Adam
hyper-parameters; every other call the SDK makes is checked against what it
must equal (forward logprobs, prompt logprobs, restored optimizer state, stop
tokens).
"""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest
import tinker
import torch
from harness import free_port, start_coordinator, start_worker, wait_workers
from reference import ReferenceTrainer
from tinker import types

from rewardsignal.data import examples_to_datums, sample_examples
from rewardsignal.data.types import Datum
from rewardsignal.lora import LoraSpec
from rewardsignal.models import load_tokenizer
from rewardsignal.protocol import tensors_from_bytes

pytestmark = pytest.mark.slow

ADAM = dict(learning_rate=2e-3, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.01)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    coord, url = start_coordinator(tmp_path_factory.mktemp("data"))
    workers = [start_worker(url, "w0", "--max-tokens-per-task", "400")]
    wait_workers(url, 1)
    sc = tinker.ServiceClient(base_url=url, api_key="tml-test")
    state = {"url": url, "sc": sc, "coord": coord, "workers": workers}
    yield state
    _close(sc)
    for w in state["workers"]:
        w.stop()
    coord.stop()


def _close(sc) -> None:
    """End a client's session while its coordinator is up (else the SDK's
    last telemetry flush fails at exit, after the tests, with a traceback)."""
    try:
        sc.close().result(timeout=30)
    except Exception:  # its coordinator already went: nothing more to tell it
        pass


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "X-API-Key": "tml-test"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def _run_id(url: str, tc) -> str:
    return _post(url, "/api/v1/get_info", {"model_id": tc.model_id})["signal_run_id"]


def _weights(url: str, run_id: str, version: str = "latest") -> dict[str, torch.Tensor]:
    if version == "latest":
        info = json.loads(urllib.request.urlopen(f"{url}/v1/runs/{run_id}", timeout=30).read())
        version = str(info["version"])
    raw = urllib.request.urlopen(f"{url}/v1/runs/{run_id}/weights/{version}", timeout=30).read()
    return tensors_from_bytes(raw)


def _tinker_datum(d: Datum) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(list(d.input_ids)),
                       loss_fn_inputs={"target_tokens": np.array(d.target_ids, dtype=np.int64),
                                       "weights": np.array(d.weights, dtype=np.float32)})


def _batches(steps: int, size: int) -> list[list[Datum]]:
    tok = load_tokenizer("signal-tiny")
    examples = sample_examples()
    return [examples_to_datums(examples[i * size:(i + 1) * size], tok) for i in range(steps)]


def _max_diff(a: dict, b: dict) -> float:
    # PEFT's state dict also carries a targeted lm_head's frozen base weight.
    a, b = ({k: v for k, v in x.items() if "lora_" in k} for x in (a, b))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _train_and_compare(cluster, seed: int) -> None:
    url, sc = cluster["url"], cluster["sc"]
    tc = sc.create_lora_training_client(base_model="signal-tiny", rank=4, seed=seed)
    run_id = _run_id(url, tc)
    run = json.loads(urllib.request.urlopen(f"{url}/v1/runs/{run_id}", timeout=30).read())
    spec = LoraSpec(r=4, alpha=32.0, target_modules=tuple(run["lora_target_modules"]),
                    seed=seed)
    assert "lm_head" in spec.target_modules  # train_unembed defaults to on
    ref = ReferenceTrainer("signal-tiny", spec, _weights(url, run_id, "0"),
                           lr=ADAM["learning_rate"], betas=(ADAM["beta1"], ADAM["beta2"]),
                           eps=ADAM["eps"], weight_decay=ADAM["weight_decay"])
    for batch in _batches(3, 6):
        fb = tc.forward_backward([_tinker_datum(d) for d in batch], "cross_entropy")
        step = tc.optim_step(types.AdamParams(**ADAM))
        got_loss = fb.result().metrics["loss:sum"]
        step.result()
        want_loss = ref.step(batch, reduction="sum")
        assert got_loss == pytest.approx(want_loss, rel=1e-5)
    got, want = _weights(url, run_id), ref.adapter()
    assert _max_diff(got, want) <= 1e-5
    assert max(float(v.abs().max()) for k, v in want.items() if "lora_B" in k) > 1e-3


def test_weights_equal_single_process_peft_with_one_worker(cluster):
    _train_and_compare(cluster, seed=5)


def test_every_sdk_call_against_what_it_must_equal(cluster):
    url, sc = cluster["url"], cluster["sc"]
    tc = sc.create_lora_training_client(base_model="signal-tiny", rank=4, seed=1)
    tok = tc.get_tokenizer()
    batch = [_tinker_datum(d) for d in _batches(1, 4)[0]]

    # forward and forward_backward see the same logprobs at the same version.
    fwd = tc.forward(batch, "cross_entropy").result()
    fb = tc.forward_backward(batch, "cross_entropy").result()
    for a, b, d in zip(fwd.loss_fn_outputs, fb.loss_fn_outputs, batch, strict=True):
        assert a["logprobs"].shape == [d.model_input.length]
        np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(),
                                   atol=1e-5)
    lps = [o["logprobs"].to_numpy() for o in fwd.loss_fn_outputs]
    want_ce = -sum(float((lp * d.loss_fn_inputs["weights"].to_numpy()).sum())
                   for lp, d in zip(lps, batch, strict=True))
    assert fb.metrics["loss:sum"] == pytest.approx(want_ce, rel=1e-5)

    # RL losses: with the sampler's logprobs equal to the model's, the ratio is 1.
    rl = []
    for d, lp in zip(batch, lps, strict=True):
        adv = np.linspace(-1, 1, len(lp)).astype(np.float32)
        rl.append(types.Datum(model_input=d.model_input, loss_fn_inputs={
            "target_tokens": d.loss_fn_inputs["target_tokens"], "logprobs": lp,
            "advantages": adv}))
    want_is = -sum(float(d.loss_fn_inputs["advantages"].to_numpy().sum()) for d in rl)
    for loss_fn in ("importance_sampling", "ppo"):
        out = tc.forward_backward(rl, loss_fn).result()
        assert out.metrics["loss:sum"] == pytest.approx(want_is, abs=1e-3)

    # A custom loss: a forward, the loss on the client, then a weighted CE.
    def custom(data, logprobs_list):
        loss = sum((lp ** 2).sum() for lp in logprobs_list)
        return loss, {"custom_metric:sum": float(loss)}

    out = tc.forward_backward_custom(batch, custom).result()
    want_custom = sum(float((lp.astype(np.float64) ** 2).sum()) for lp in lps)
    assert out.metrics["loss:sum"] == pytest.approx(want_custom, rel=1e-4)
    assert "surrogate_loss:sum" in out.metrics
    tc.optim_step(types.AdamParams(**ADAM)).result()

    # save_state, then load it into new models: with the optimizer state, one
    # more identical step lands exactly where the original lands; without it,
    # elsewhere.
    saved = tc.save_state("ck1").result()
    assert saved.path == f"tinker://{tc.model_id}/weights/ck1"
    with_opt = sc.create_training_client_from_state_with_optimizer(saved.path)
    without = sc.create_training_client_from_state(saved.path)
    for client in (tc, with_opt, without):
        client.forward_backward(batch, "cross_entropy")
        client.optim_step(types.AdamParams(**ADAM)).result()
    base = _weights(url, _run_id(url, tc))
    assert _max_diff(base, _weights(url, _run_id(url, with_opt))) <= 1e-6
    assert _max_diff(base, _weights(url, _run_id(url, without))) > 1e-4
    # load_state into an existing model puts its weights back to the checkpoint.
    without.load_state(saved.path).result()
    ck_run = _run_id(url, tc)
    names = _post(url, "/api/v1/weights_info", {"tinker_path": saved.path})
    assert names["base_model"] == "signal-tiny" and names["lora_rank"] == 4
    assert _max_diff(_weights(url, _run_id(url, without)),
                     _weights(url, ck_run, str(_version_of(url, ck_run) - 1))) == 0.0

    # Sampling from a snapshot: num_samples sequences; a stop token ends one.
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(tok.encode("The quick brown", add_special_tokens=False))
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
    first = sampler.sample(prompt, num_samples=3, sampling_params=greedy).result()
    assert len(first.sequences) == 3
    assert all(s.tokens == first.sequences[0].tokens for s in first.sequences)
    assert all(len(s.logprobs) == len(s.tokens) == 6 for s in first.sequences)
    stop_at = first.sequences[0].tokens[2]
    stopped = sampler.sample(prompt, num_samples=2, sampling_params=types.SamplingParams(
        max_tokens=6, temperature=0.0, stop=[stop_at])).result()
    cut = first.sequences[0].tokens[: first.sequences[0].tokens.index(stop_at) + 1]
    assert all(s.tokens == cut and s.stop_reason == "stop" for s in stopped.sequences)
    seeded = types.SamplingParams(max_tokens=5, temperature=1.0, seed=7)
    a = sampler.sample(prompt, num_samples=4, sampling_params=seeded).result()
    b = sampler.sample(prompt, num_samples=4, sampling_params=seeded).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]

    # compute_logprobs: the prompt's logprobs equal a forward pass's at that version.
    ids = list(batch[0].model_input.to_ints()) + [int(batch[0].loss_fn_inputs[
        "target_tokens"].to_numpy()[-1])]
    got = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    assert got[0] is None and len(got) == len(ids)
    now = tc.forward([batch[0]], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    np.testing.assert_allclose(np.array(got[1:], dtype=np.float32), now.to_numpy(), atol=1e-4)

    # A named sampler checkpoint, opened by path; listed by the RestClient.
    named = tc.save_weights_for_sampler("snap").result()
    by_path = sc.create_sampling_client(model_path=named.path)
    assert len(by_path.sample(prompt, num_samples=1, sampling_params=greedy).result()
               .sequences[0].tokens) == 6
    listed = sc.create_rest_client().list_checkpoints(tc.model_id).result()
    assert {c.checkpoint_id for c in listed.checkpoints} >= {"weights/ck1", "sampler_weights/snap"}


def _version_of(url: str, run_id: str) -> int:
    return json.loads(urllib.request.urlopen(f"{url}/v1/runs/{run_id}", timeout=30)
                      .read())["version"]


def test_weights_equal_single_process_peft_with_three_workers(cluster):
    url = cluster["url"]
    cluster["workers"] += [start_worker(url, f"w{i}", "--max-tokens-per-task", "400")
                           for i in (1, 2)]
    wait_workers(url, 3)
    _train_and_compare(cluster, seed=9)


def test_close_finishes_the_session(cluster):
    url = cluster["url"]
    with tinker.ServiceClient(base_url=url, api_key="tml-test") as sc:
        sc.create_lora_training_client(base_model="signal-tiny", rank=2)
    cluster["coord"].wait_for(r"tinker session finished id=\S+ reason=success", 30)


def test_keys_reach_the_tinker_routes_as_x_api_key(tmp_path):
    coord, url = start_coordinator(tmp_path / "data", "--api-key", "tml-right")
    clients = []
    try:
        good = tinker.ServiceClient(base_url=url, api_key="tml-right")
        clients.append(good)
        caps = good.get_server_capabilities()
        assert "signal-tiny" in {m.model_name for m in caps.supported_models}
        bad = tinker.ServiceClient(base_url=url, api_key="tml-wrong")
        clients.append(bad)
        with pytest.raises(tinker.AuthenticationError, match="invalid or revoked API key"):
            bad.get_server_capabilities()
    finally:
        for client in clients:
            _close(client)
        coord.stop()


def test_calls_and_names_survive_a_coordinator_restart(tmp_path):
    """A forward_backward accepted while no worker is up survives a restart:
    the same client's future completes once a worker joins, its next calls go
    on in order, and checkpoint paths still resolve."""
    port = free_port()
    coord, url = start_coordinator(tmp_path / "data", "--port", port)
    worker, clients = None, []
    try:
        sc = tinker.ServiceClient(base_url=url, api_key="tml-test")
        clients.append(sc)
        tc = sc.create_lora_training_client(base_model="signal-tiny", rank=2)
        path = tc.save_state("before").result().path  # needs no worker: the coordinator saves
        run_id = _run_id(url, tc)
        batch = [_tinker_datum(d) for d in _batches(1, 2)[0]]
        pending = tc.forward_backward(batch, "cross_entropy")
        deadline = time.monotonic() + 30
        while json.loads(urllib.request.urlopen(f"{url}/v1/status", timeout=10).read())[
                "tasks"]["pending"] == 0:  # accepted and waiting for a worker
            assert time.monotonic() < deadline, "the forward_backward never reached the queue"
            time.sleep(0.1)
        coord.stop()
        coord, url = start_coordinator(tmp_path / "data", "--port", port)
        worker = start_worker(url, "w0")
        out = pending.result(timeout=180)
        assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [
            [d.model_input.length] for d in batch]
        tc.optim_step(types.AdamParams(**ADAM)).result(timeout=60)
        assert _version_of(url, run_id) == 1
        again = tinker.ServiceClient(base_url=url, api_key="tml-test")
        clients.append(again)
        info = _post(url, "/api/v1/weights_info", {"tinker_path": path})
        assert info["lora_rank"] == 2 and info["base_model"] == "signal-tiny"
        restored = again.create_training_client_from_state(path)
        assert _max_diff(_weights(url, _run_id(url, restored)), _weights(url, run_id, "0")) == 0
    finally:
        for client in clients:
            _close(client)
        if worker is not None:
            worker.stop()
        coord.stop()
