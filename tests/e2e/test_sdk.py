"""SDK features against one shared cluster (a coordinator and two worker processes)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from harness import start_coordinator, start_worker, wait_workers
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rewardsignal import AsyncSignalClient, SignalClient
from rewardsignal.data import sample_examples
from rewardsignal.errors import NotFoundError, ValidationError
from rewardsignal.models import load_model
from rewardsignal.protocol import tensors_from_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    coord, url = start_coordinator(tmp_path_factory.mktemp("data"))
    workers = [start_worker(url, f"w{i}") for i in range(2)]
    client = SignalClient(base_url=url)
    wait_workers(url, 2)
    yield url, client
    client.close()
    for w in workers:
        w.stop()
    coord.stop()


def _weights(client, run, version):
    raw = client._loop.run(client._target._http("GET", f"/v1/runs/{run.run_id}/weights/{version}",
                                                raw=True))
    return tensors_from_bytes(raw)


def test_custom_loss_equals_built_in_cross_entropy(cluster):
    _, client = cluster
    batch = sample_examples()[:6]
    a = client.create_run(base_model="signal-tiny", lora_r=2, learning_rate=1e-3, seed=9)
    b = client.create_run(base_model="signal-tiny", lora_r=2, learning_rate=1e-3, seed=9)
    ra = a.forward_backward(batch=batch)
    a.optim_step()

    def mean_nll(datums, logprobs):
        ws = [torch.tensor(d["loss_fn_inputs"]["weights"]) for d in datums]
        total = sum(w.sum() for w in ws)
        return -sum((lp * w).sum() for lp, w in zip(logprobs, ws, strict=True)) / total

    rb = b.forward_backward_custom(batch, mean_nll)
    b.optim_step()
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
    wa, wb = _weights(client, a, 1), _weights(client, b, 1)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    assert max(float(wa[k].abs().max()) for k in wa if "lora_B" in k) > 0  # it moved


def test_pipelined_step_equals_the_two_calls_in_turn(cluster):
    _, client = cluster
    batch = sample_examples()[:6]
    a = client.create_run(base_model="signal-tiny", lora_r=2, learning_rate=1e-3, seed=5)
    b = client.create_run(base_model="signal-tiny", lora_r=2, learning_rate=1e-3, seed=5)
    for step in (1, 2):
        fa = a.forward_backward(batch=batch)
        sa = a.optim_step(weight_decay=0.01)
        fb, sb = b.forward_backward_optim_step(batch, weight_decay=0.01)
        assert sb["version"] == sa["version"] == step and fb["version"] == step - 1
        assert fb["loss"] == pytest.approx(fa["loss"], rel=1e-6)
    wa, wb = _weights(client, a, 2), _weights(client, b, 2)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    assert max(float(wa[k].abs().max()) for k in wa if "lora_B" in k) > 0  # it moved
    # A batch refused at the door queues no step behind it.
    with pytest.raises(ValidationError, match="loss_fn"):
        b.forward_backward_optim_step(batch, loss_fn="no-such-loss")
    assert b.info()["version"] == 2


def test_forward_returns_logprobs_and_changes_nothing(cluster):
    _, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=2)
    batch = sample_examples()[:3]
    fwd = run.forward(batch)
    fb = run.forward_backward(batch)
    assert fwd["loss"] == pytest.approx(fb["loss"], rel=1e-6)
    for x, y in zip(fwd["logprobs"], fb["logprobs"], strict=True):
        assert x == pytest.approx(y, abs=1e-5)
    assert [len(d["model_input"]) for d in fwd["datums"]] == [len(x) for x in fwd["logprobs"]]
    assert run.info()["pending_forward_backward"] == 1  # only the forward_backward counted


def test_merged_export_loads_with_plain_transformers(cluster, tmp_path):
    _, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=4, learning_rate=5e-3)
    for _ in range(2):
        run.forward_backward(sample_examples()[:8])
        run.optim_step()
    adapter = run.download(run.save_state(mode="adapter"), tmp_path / "adapter")
    merged_art = run.save_state(mode="merged")
    assert merged_art["mode"] == "merged" and merged_art["version"] == 2
    merged_dir = run.download(merged_art, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with_adapter = PeftModel.from_pretrained(load_model("signal-tiny"), str(adapter))
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits,
                              atol=1e-4)
    # Saving again under the same name is idempotent; another version under it is refused.
    assert run.save_state(mode="merged") == merged_art


def test_async_client_and_concurrent_calls(cluster):
    url, _ = cluster

    async def go():
        async with AsyncSignalClient(base_url=url) as client:
            run = await client.create_run("signal-tiny", lora_r=2, learning_rate=1e-3)
            ex = sample_examples()
            results = await asyncio.gather(*[run.forward_backward(ex[i * 4:(i + 1) * 4])
                                             for i in range(3)])
            out = await run.optim_step()
            info = await client.get_run(run.run_id)
            runs = await client.list_runs()
            return results, out, info, runs, run.run_id

    results, out, info, runs, run_id = asyncio.run(go())
    assert out["version"] == 1 and info["version"] == 1
    assert info["history"][-1]["tokens"] == sum(r["num_tokens"] for r in results)
    assert run_id in [r["run_id"] for r in runs]


def test_rl_losses_run_end_to_end(cluster):
    _, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=2)
    datum = {"model_input": [1, 50, 60, 70], "loss_fn_inputs": {
        "target_tokens": [50, 60, 70, 2], "logprobs": [-5.0, -5.0, -5.0, -5.0],
        "advantages": [0.0, 1.0, -1.0, 0.5], "weights": [0, 1, 1, 1]}}
    for loss_fn in ("importance_sampling", "ppo"):
        res = run.forward_backward([datum], loss_fn=loss_fn)
        assert res["num_tokens"] == 4 and res["weight_sum"] == 3.0
    assert run.optim_step()["version"] == 1


def test_typed_errors_reach_the_caller(cluster):
    _, client = cluster
    with pytest.raises(NotFoundError):
        client.get_run("run-000000000000")
    run = client.create_run(base_model="signal-tiny", lora_r=2)
    with pytest.raises(ValidationError, match=r"batch\[0\]: field 'text' is empty"):
        run.forward_backward([{"text": ""}])
    with pytest.raises(ValidationError, match="call forward_backward before optim_step"):
        run.optim_step()
    # A value msgpack cannot carry goes as JSON, and is refused as any bad value is.
    with pytest.raises(ValidationError, match="seed"):
        run.sample(prompts=["hi"], max_tokens=2, seed=2**70)
    assert "signal-tiny" in client.list_models()
    assert {w["name"] for w in client.list_workers()} == {"w0", "w1"}


def test_status_cli_shows_runs_and_workers(cluster):
    import subprocess
    import sys

    url, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=2)
    res = subprocess.run([sys.executable, "-m", "rewardsignal.cli", "status", "--coordinator",
                          url], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert run.run_id in res.stdout and "signal-tiny" in res.stdout
    assert "w0" in res.stdout and "w1" in res.stdout and "WORKER" in res.stdout
    dead = subprocess.run([sys.executable, "-m", "rewardsignal.cli", "status", "--coordinator",
                           "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert dead.returncode == 2 and "cannot reach the coordinator" in dead.stderr


def test_load_state_brings_back_a_saved_state_as_the_next_version(cluster):
    _, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=2, learning_rate=1e-2, seed=3)
    batch = sample_examples()[:2]
    run.forward_backward(batch)
    run.optim_step()
    assert run.save_state(name="first")["version"] == 1
    run.forward_backward(batch)
    run.optim_step()
    out = run.load_state("first")
    assert out["version"] == 3 and out["loaded_from"] == f"{run.run_id}@1"
    w1, w3 = _weights(client, run, 1), _weights(client, run, 3)
    assert all(torch.equal(w1[k], w3[k]) for k in w1)
    other = client.create_run(base_model="signal-tiny", lora_r=2, seed=4)
    assert other.load_state(version=2, from_run=run.run_id)["loaded_from"] == f"{run.run_id}@2"
    with pytest.raises(NotFoundError, match="no saved state named 'nope'"):
        run.load_state("nope")
