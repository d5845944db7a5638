"""What users already have runs as written: the hosted API's quickstart, its
``save_state(push_to_hub=...)`` (against a local recording Hub), custom LoRA
target modules, and dropout that fires in training only. One coordinator and
one worker process shared by the module."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from harness import start_coordinator, start_worker, wait_workers

from rewardsignal import SignalClient
from rewardsignal.errors import DataError, NotFoundError, ValidationError
from rewardsignal.protocol import tensors_from_bytes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def cluster(data_dir):
    coord, url = start_coordinator(data_dir)
    worker = start_worker(url, "w0")
    client = SignalClient(base_url=url)
    wait_workers(url, 1)
    yield url, client
    client.close()
    worker.stop()
    coord.stop()


def _script_env(url: str, **extra: str) -> dict:
    return {**os.environ, "SIGNAL_URL": url, "PYTHONUNBUFFERED": "1", **extra}


def test_quickstart_runs_as_written(cluster):
    url, client = cluster
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         capture_output=True, text=True, timeout=300, env=_script_env(url))
    assert res.returncode == 0, res.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^Step \d+: Loss = (\d+\.\d+)$", res.stdout, re.M)]
    assert len(losses) == 10
    assert losses[-1] < losses[0]  # the lone input / lone output texts are learned
    path = res.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"signal://(run-\w+)/(v0+10)", path)
    assert m, res.stdout
    run = client.run(m.group(1))
    assert [a["name"] for a in run.list_artifacts()] == [m.group(2)]


class _RecordingHub(BaseHTTPRequestHandler):
    """Just enough of the Hub's HTTP API for ``create_repo`` + ``create_commit``:
    every file is declared a regular (inline) upload, and each request is
    recorded for the test to read."""

    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                              "body": body})
        host = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            req = json.loads(body)
            answer = {"url": f"{host}/{req['organization']}/{req['name']}"}
        elif "/preupload/" in self.path:
            answer = {"files": [{"path": f["path"], "uploadMode": "regular",
                                 "shouldIgnore": False} for f in json.loads(body)["files"]]}
        elif "/commit/" in self.path:
            repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
            answer = {"commitUrl": f"{host}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40}
        else:
            self.send_error(404)
            return
        raw = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args) -> None:
        pass


_PUSH = """
import json, os
from rewardsignal import SignalClient
client = SignalClient(base_url=os.environ["SIGNAL_URL"])
run = client.create_run(base_model="signal-tiny", lora_r=4, learning_rate=1e-2)
run.forward_backward(batch=[{"text": "push me"}])
run.optim_step()
artifact = run.save_state(mode="adapter", push_to_hub=True, hub_model_id="alice/tiny-adapter",
                          private=True)
print(json.dumps({"run_id": run.run_id, "artifact": artifact}))
"""


def test_save_state_pushes_the_export_to_the_hub(cluster, tmp_path):
    url, client = cluster
    hub = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
        res = subprocess.run([sys.executable, "-c", _PUSH], capture_output=True, text=True,
                             timeout=300, env=_script_env(
                                 url, HF_ENDPOINT=endpoint, HF_TOKEN="hf_test_token",
                                 HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
                                 HF_HOME=str(tmp_path / "hf-home")))
    finally:
        hub.shutdown()
        hub.server_close()
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    artifact = out["artifact"]
    assert artifact["hub"]["repo_id"] == "alice/tiny-adapter"
    recorded = _RecordingHub.requests
    assert all(r["auth"] == "Bearer hf_test_token" for r in recorded)
    create = json.loads(recorded[0]["body"])
    assert recorded[0]["path"] == "/api/repos/create"
    assert (create["organization"], create["name"], create["visibility"]) == (
        "alice", "tiny-adapter", "private")
    commit = next(r for r in recorded if r["path"].startswith("/api/models/alice/tiny-adapter"
                                                              "/commit/"))
    lines = [json.loads(x) for x in commit["body"].splitlines() if x.strip()]
    pushed = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
              for x in lines if x["key"] == "file"}
    # Exactly the export's files, byte for byte as the coordinator serves them.
    local = client.run(out["run_id"]).download(artifact, tmp_path / "adapter")
    assert set(pushed) == {f["path"] for f in artifact["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(pushed)
    for name, data in pushed.items():
        assert data == (local / name).read_bytes()


def test_push_without_a_repo_id_is_refused_before_saving(cluster):
    _, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=2)
    with pytest.raises(ValidationError, match="hub_model_id"):
        run.save_state(push_to_hub=True)
    with pytest.raises(ValidationError, match="not a Hub repo id"):
        run.save_state(push_to_hub=True, hub_model_id="../etc")
    assert run.list_artifacts() == []


def _weights(client, run_id: str, version: int) -> dict:
    raw = client._loop.run(client._target._http("GET", f"/v1/runs/{run_id}/weights/{version}",
                                                raw=True))
    return tensors_from_bytes(raw)


def test_lora_target_modules_train_only_the_named_modules(cluster, tmp_path):
    _, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=4, lora_dropout=0.1,
                            lora_target_modules=["q_proj", "down_proj"], learning_rate=1e-2)
    run.forward_backward(batch=[{"text": "only two kinds of module learn this"}])
    assert run.optim_step()["version"] == 1
    weights = _weights(client, run.run_id, 1)
    modules = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in weights}
    assert modules == {"q_proj", "down_proj"}
    assert all(float(t.abs().max()) > 0 for name, t in weights.items() if ".lora_B." in name)
    adapter = run.download(run.save_state(), tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj"]
    assert config["lora_dropout"] == 0.1


def test_dropout_fires_in_training_only(cluster):
    _, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=8, lora_dropout=0.5,
                            learning_rate=5e-2, seed=3)
    batch = [{"input": "The meaning of life is", "output": " to learn."}]
    # One step first: with lora_B = 0 the adapter adds nothing, dropped or not.
    run.forward_backward(batch)
    run.optim_step()
    train_losses = {run.forward_backward(batch)["loss"] for _ in range(3)}
    assert len(train_losses) > 1  # training draws dropout masks
    greedy = [run.sample(prompts=["The meaning of life is"], temperature=0, max_tokens=16)
              for _ in range(2)]
    assert greedy[0]["sequences"][0][0]["tokens"] == greedy[1]["sequences"][0][0]["tokens"]
    first, second = run.forward(batch), run.forward(batch)
    assert first["logprobs"] == second["logprobs"] and first["loss"] == second["loss"]


HELD_OUT = [{"input": "2+2=", "output": "4"}, {"text": "Paris is the capital of France."},
            {"prompt": "Say hi:", "completion": " hi"}]


def test_evaluate_gives_held_out_loss_at_a_version(cluster, tmp_path):
    _, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=4, learning_rate=2e-2)
    at0 = run.evaluate(HELD_OUT)
    fwd = run.forward(HELD_OUT)
    assert at0["version"] == 0 and at0["num_examples"] == 3
    assert at0["loss"] == pytest.approx(fwd["loss"], rel=1e-6)
    assert at0["perplexity"] == pytest.approx(math.exp(at0["loss"]), rel=1e-9)
    for _ in range(2):
        run.forward_backward(HELD_OUT)
        run.optim_step()
    # Chunked (one example per request), from a file, at the old version: the same number.
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in HELD_OUT))
    again = run.evaluate(path, version=0, batch_size=1)
    assert again["loss"] == pytest.approx(at0["loss"], rel=1e-6) and again["version"] == 0
    latest = run.evaluate(HELD_OUT)
    assert latest["version"] == 2 and latest["loss"] < at0["loss"]  # trained on these
    assert run.info()["version"] == 2  # evaluating changed nothing
    path.write_text(json.dumps(HELD_OUT[0]) + "\n\n" + json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"^held.jsonl line 3: unrecognised example"):
        run.evaluate(path)


def test_delete_removes_the_run_and_everything_it_owns(cluster, data_dir, tmp_path):
    url, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=2, learning_rate=1e-2)
    run.forward_backward(HELD_OUT)
    run.optim_step()
    run.forward_backward(HELD_OUT)  # a pending gradient, not yet stepped
    job = run.train_federated(HELD_OUT, rounds=1, local_steps=1, batch_size=2,
                              tasks_per_round=1)
    job.wait(timeout=120, progress=False)
    assert [j["job_id"] for j in run.jobs()] == [job.job_id]
    status = _cli(url, "status")
    row = next(line for line in status.stdout.splitlines() if line.startswith(job.job_id))
    assert run.run_id in row and "done" in row and " 1/1 " in row, status.stdout
    old = run.save_state(version=1)
    assert old["version"] == 1 and old["name"] == "v000001"
    assert [a["name"] for a in run.list_artifacts()] == ["v000001"]
    keep = client.create_run(base_model="signal-tiny", lora_r=2)
    owned = [data_dir / "checkpoints" / run.run_id, data_dir / "artifacts" / run.run_id]
    assert all(p.is_dir() for p in owned)

    out = run.delete()

    assert out["run_id"] == run.run_id and out["deleted"] is True
    assert not any(p.exists() for p in owned)
    assert not (data_dir / "pending" / run.run_id).exists()
    assert not list((data_dir / "jobs").glob(f"{job.job_id}*"))
    assert run.run_id not in [r["run_id"] for r in client.list_runs()]
    assert keep.run_id in [r["run_id"] for r in client.list_runs()]
    for call in (run.info, run.list_artifacts, run.jobs, run.delete):
        with pytest.raises(NotFoundError):
            call()
    with pytest.raises(NotFoundError):
        job.status()
    metrics = client._loop.run(client._target._http("GET", "/metrics", raw=True)).decode()
    assert run.run_id not in metrics and keep.run_id in metrics


def _cli(url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rewardsignal.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=120,
                          env=_script_env(url))


def test_cli_lists_downloads_and_deletes_after_confirmation(cluster, tmp_path):
    url, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=2, learning_rate=1e-2)
    run.forward_backward(HELD_OUT)
    run.optim_step()
    listed = _cli(url, "runs", "list")
    assert listed.returncode == 0 and run.run_id in listed.stdout, listed.stderr
    got = _cli(url, "download", "--run", run.run_id, "--version", "0", "--out",
               str(tmp_path / "v0"))
    assert got.returncode == 0, got.stderr
    config = json.loads((tmp_path / "v0" / "adapter_config.json").read_text())
    assert config["r"] == 2
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in HELD_OUT))
    trained = _cli(url, "train", "--run-id", run.run_id, "--dataset", str(data), "--rounds", "1",
                   "--local-steps", "1", "--batch-size", "2", "--num-tasks-per-round", "1")
    assert trained.returncode == 0, trained.stderr
    assert f"signal download --run {run.run_id} --out" in trained.stdout  # how to get it
    arts = _cli(url, "artifacts", "list", "--run", run.run_id)
    assert arts.returncode == 0 and "v000000" in arts.stdout and "adapter" in arts.stdout
    refused = _cli(url, "runs", "delete", run.run_id, stdin="n\n")
    assert refused.returncode == 1 and "cannot be undone" in refused.stdout
    assert run.info()["run_id"] == run.run_id  # still there
    done = _cli(url, "runs", "delete", run.run_id, stdin="y\n")
    assert done.returncode == 0 and f"deleted run {run.run_id}" in done.stdout
    with pytest.raises(NotFoundError):
        run.info()


def test_train_cli_checks_the_dataset_before_it_creates_a_run(cluster, tmp_path):
    url, client = cluster
    before = {r["run_id"] for r in client.list_runs()}
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    res = _cli(url, "train", "--dataset", str(bad_json), "--rounds", "1")
    assert res.returncode == 2 and "broken.jsonl line 2: invalid JSON" in res.stderr
    bad_shape = tmp_path / "shapes.jsonl"
    bad_shape.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"txt": "x"})
                         + "\n")
    res = _cli(url, "train", "--dataset", str(bad_shape), "--rounds", "1")
    assert res.returncode == 2 and "shapes.jsonl line 3: unrecognised example" in res.stderr
    assert {r["run_id"] for r in client.list_runs()} == before  # no empty run left behind


def test_cosine_schedule_example_steps_at_the_scheduled_rates(cluster):
    url, _ = cluster
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "lr_schedule.py"),
                          "--steps", "6", "--warmup", "2", "--peak-lr", "0.004",
                          "--batch-size", "2"], capture_output=True, text=True, timeout=300,
                         env=_script_env(url))
    assert res.returncode == 0, res.stderr[-3000:]
    rates = [float(x) for x in re.findall(r"lr (\d+\.\d+)", res.stdout)]
    # Warm-up 0.002, 0.004, then half a cosine from the peak to 0 over steps 2..5:
    # the rates the coordinator applied, as it reports them.
    expected = [0.002, 0.004, 0.004, 0.003, 0.001, 0.0]
    assert rates == pytest.approx(expected, abs=1e-6)


def test_init_from_an_adapter_directory_or_a_run_version(cluster, tmp_path):
    _, client = cluster
    src = client.create_run(base_model="signal-tiny", lora_r=4, lora_alpha=8,
                            learning_rate=2e-2, seed=5)
    src.forward_backward(HELD_OUT)
    src.optim_step()
    adapter = src.download(src.save_state(), tmp_path / "adapter")
    trained = _weights(client, src.run_id, 1)
    before = {r["run_id"] for r in client.list_runs()}

    from_dir = client.create_run(base_model="signal-tiny", lora_r=4, lora_alpha=8,
                                 init_from=str(adapter))
    from_run = client.create_run(base_model="signal-tiny", lora_r=4, lora_alpha=8,
                                 init_from=f"{src.run_id}@1")
    for run in (from_dir, from_run):
        start = _weights(client, run.run_id, 0)
        assert set(start) == set(trained)
        assert all(bool((start[k] == trained[k]).all()) for k in trained)
        assert run.evaluate(HELD_OUT)["loss"] == pytest.approx(
            src.evaluate(HELD_OUT, version=1)["loss"], rel=1e-6)

    made = {from_dir.run_id, from_run.run_id}
    with pytest.raises(ValidationError, match=r"has LoRA r=4, lora_alpha=8"):
        client.create_run(base_model="signal-tiny", lora_r=8, init_from=str(adapter))
    with pytest.raises(ValidationError, match="shape"):
        client.create_run(base_model="signal-tiny", lora_r=8, init_from=f"{src.run_id}@1")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(
        {**config, "base_model_name_or_path": "Qwen/Qwen2.5-7B"}))
    with pytest.raises(ValidationError, match="was trained on 'Qwen/Qwen2.5-7B'"):
        client.create_run(base_model="signal-tiny", lora_r=4, lora_alpha=8,
                          init_from=str(adapter))
    with pytest.raises(ValidationError, match="run_id@version"):
        client.create_run(base_model="signal-tiny", init_from="not-a-run")
    with pytest.raises(NotFoundError):
        client.create_run(base_model="signal-tiny", lora_r=4, lora_alpha=8,
                          init_from=f"{src.run_id}@9")
    assert {r["run_id"] for r in client.list_runs()} == before | made  # refusals made none


def test_downloaded_adapter_generates_what_sample_returned(cluster, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewardsignal.models import resolve_model_path

    _, client = cluster
    run = client.create_run(base_model="signal-tiny", lora_r=8, learning_rate=3e-2, seed=2)
    for _ in range(3):
        run.forward_backward([{"input": "The meaning of life is", "output": " to learn."}])
        run.optim_step()
    prompt = "The meaning of life is"
    got = run.sample(prompts=[prompt], temperature=0, max_tokens=12)
    base_path = resolve_model_path("signal-tiny")
    tok = AutoTokenizer.from_pretrained(base_path)
    ids = tok(prompt)["input_ids"]  # the usual way: BOS included by the tokenizer itself
    assert got["prompt_tokens"][0] == ids
    adapter = run.download(run.save_state(), tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "signal-tiny"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                      str(adapter)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)
    new = out[0, len(ids):].tolist()
    sampled = got["sequences"][0][0]["tokens"]
    assert sampled == new[:len(sampled)] and sampled, (sampled, new)
    # A built-in base is found by its path (`signal models` prints it).
    (adapter / "adapter_config.json").write_text(json.dumps(
        {**config, "base_model_name_or_path": str(base_path)}))
    auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    with torch.no_grad():
        again = auto.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)
    assert again[0].tolist() == out[0].tolist()
