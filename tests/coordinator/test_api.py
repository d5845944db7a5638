"""The HTTP surface: bad input is a 4xx JSON error that changes nothing; auth;
no-worker timeouts; lease expiry."""

from __future__ import annotations

import json
import time

import pytest
from apphelpers import FakeWorker, Harness


def _error(h, method, path, status, code=None, **kw):
    got, body = h.request(method, path, **kw)
    assert got == status, body
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


def _run(h) -> str:
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                       expect=201)
    return run["run_id"]


@pytest.mark.parametrize("body, match", [
    ({"base_model": "signal-tiny", "lora_r": 0}, "lora_r"),
    ({"base_model": "signal-tiny", "lora_r": "8"}, "lora_r"),
    ({"base_model": "signal-tiny", "learning_rate": -1}, "learning_rate"),
    ({"base_model": "signal-tiny", "lora_dropout": 1.5}, "lora_dropout"),
    ({"base_model": "signal-tiny", "lora_target_modules": ["nope_proj"]}, "nope_proj"),
    ({"base_model": "signal-tiny", "bogus": 1}, "unknown field"),
    ({"lora_r": 8}, "base_model"),
    ([1, 2], "JSON object"),
])
def test_create_run_rejects_bad_input(harness, body, match):
    msg = _error(harness, "POST", "/v1/runs", 400, json=body)
    assert match in msg
    _, runs = harness.request("GET", "/v1/runs", expect=200)
    assert runs["runs"] == []


def test_unknown_base_model_is_404(harness):
    msg = _error(harness, "POST", "/v1/runs", 404, json={"base_model": "no-such-model"})
    assert "unknown base model" in msg


def test_malformed_json_and_unknown_routes(harness):
    assert "not valid JSON" in _error(harness, "POST", "/v1/runs", 400, data=b"{nope",
                                      headers={"Content-Type": "application/json"})
    _error(harness, "GET", "/v1/nothing-here", 404, "not_found")
    _error(harness, "DELETE", "/v1/runs", 405, "method_not_allowed")
    _error(harness, "GET", "/v1/runs/run-doesnotexist", 404, "not_found")
    _error(harness, "GET", "/v1/requests/req-nope", 404, "not_found")


@pytest.mark.parametrize("op, body, match", [
    ("forward_backward", {"batch": []}, "non-empty list"),
    ("forward_backward", {"batch": [{"text": 5}]}, "batch[0]: field 'text'"),
    ("forward_backward", {"batch": [{"text": "a"}], "loss_fn": "mse"}, "loss_fn"),
    ("forward_backward", {"batch": [{"text": "a"}], "loss_fn": "ppo"}, "needs loss_fn_inputs"),
    ("forward_backward", {"batch": [{"text": "a"}], "reduction": "avg"}, "reduction"),
    ("forward_backward", {"batch": [{"text": "a"}], "timeout_s": -1}, "timeout_s"),
    ("optim_step", {"learning_rate": -0.1}, "learning_rate"),
    ("optim_step", {"beta1": 1.0}, "beta1"),
    ("sample", {"prompts": ["hi"], "temperature": -1}, "temperature"),
    ("sample", {"prompts": ["hi"], "max_tokens": 10 ** 9}, "max_tokens"),
    ("sample", {"prompts": ["hi"], "max_tokens": 600}, "context"),
    ("sample", {}, "exactly one of"),
    ("sample", {"prompt_tokens": [[1, 99999]]}, "token ids"),
    ("save_state", {"mode": "zip"}, "mode"),
    ("save_state", {"name": "../../etc"}, "name"),
    ("launch_missiles", {}, "unknown operation"),
])
def test_run_operations_reject_bad_input(harness, op, body, match):
    run_id = _run(harness)
    status = 404 if op == "launch_missiles" else 400
    msg = _error(harness, "POST", f"/v1/runs/{run_id}/{op}", status, json=body)
    assert match in msg
    run = harness.coordinator.runs[run_id]
    assert run.version == 0 and run.accum.empty and run.processor.queue.empty()


@pytest.mark.parametrize("body, status, match", [
    ({"version": 0, "name": "x"}, 400, "exactly one of"),
    ({"name": "never-saved"}, 404, "no saved state named"),
    ({"version": 99}, 404, "99"),
    ({"version": 0, "from_run": "run-elsewhere"}, 404, "unknown run"),
    ({"version": 0, "from_run": "OTHER_SHAPE"}, 400, "does not have run"),
])
def test_load_state_rejects_what_it_cannot_load(harness, body, status, match):
    run_id = _run(harness)
    if body.get("from_run") == "OTHER_SHAPE":
        _, other = harness.request("POST", "/v1/runs", json={"base_model": "signal-tiny",
                                                            "lora_r": 3}, expect=201)
        body = {**body, "from_run": other["run_id"]}
    msg = _error(harness, "POST", f"/v1/runs/{run_id}/load_state", status, json=body)
    assert match in msg
    run = harness.coordinator.runs[run_id]
    assert run.version == 0 and run.processor.queue.empty()


def test_oversized_body_is_413(tmp_path):
    h = Harness(tmp_path / "data", max_body_bytes=4096)
    try:
        run_id = _run(h)
        big = {"batch": [{"text": "x" * 10000}]}
        _error(h, "POST", f"/v1/runs/{run_id}/forward_backward", 413, "payload_too_large",
               json=big)
        assert h.coordinator.runs[run_id].processor.queue.empty()

        async def chunks(n: int):  # no Content-Length: the limit is enforced as it arrives
            for _ in range(n):
                yield b'{"text": "' + b"y" * 1000 + b'"}\n'

        _error(h, "POST", "/v1/datasets?name=big.jsonl", 413, "payload_too_large",
               data=chunks(10))
        _, small = h.request("POST", "/v1/datasets?name=ok.jsonl", data=chunks(2), expect=201)
        assert small["num_examples"] == 2
        stored = sorted(p.name for p in h.coordinator.services.datasets.root.glob("*.json"))
        assert stored == [small["dataset_id"] + ".json"]  # the refused upload left nothing
    finally:
        h.close()


def test_auth_scopes(tmp_path):
    h = Harness(tmp_path / "data", api_keys=("sk-alice", "sk-bob"), worker_tokens=("wt-1",))
    try:
        alice = {"Authorization": "Bearer sk-alice"}
        bob = {"Authorization": "Bearer sk-bob"}
        worker = {"Authorization": "Bearer wt-1"}
        h.request("GET", "/healthz", expect=200)
        h.request("GET", "/metrics", expect=200)
        # Each auth error says how to pass a key, in each place a user passes one.
        for msg in (_error(h, "GET", "/v1/runs", 401, "unauthorized"),
                    _error(h, "GET", "/v1/runs", 401,
                           headers={"Authorization": "Bearer sk-mallory"})):
            assert "--api-key" in msg and "SIGNAL_API_KEY" in msg, msg
        assert "worker token" in _error(h, "GET", "/v1/runs", 401, headers=worker)
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                           headers=alice, expect=201)
        rid = run["run_id"]
        # Bob sees nothing of Alice's: her run is a 404, same as a missing one.
        _error(h, "GET", f"/v1/runs/{rid}", 404, headers=bob)
        _error(h, "GET", f"/v1/runs/{rid}/weights/0", 404, headers=bob)
        _error(h, "POST", f"/v1/runs/{rid}/optim_step", 404, headers=bob, json={})
        assert h.request("GET", "/v1/runs", headers=bob, expect=200)[1]["runs"] == []
        h.request("GET", f"/v1/runs/{rid}/weights/0", headers=alice, expect=200)
        # Workers need their token; a user key is not one.
        _error(h, "POST", "/v1/workers/register", 401, headers=alice,
               json={"name": "w", "device": "cpu"})
        code, body = h.request("POST", "/v1/workers/register", headers=worker,
                               json={"name": "w", "device": "cpu"})
        assert code == 201
        # A worker may fetch weights only for a run it holds a lease on.
        _error(h, "GET", f"/v1/runs/{rid}/weights/0", 404,
               headers={**worker, "X-Signal-Worker": body["worker_id"]})
    finally:
        h.close()


def test_no_worker_fails_clearly_after_the_callers_timeout(harness):
    run_id = _run(harness)
    _, req = harness.request("POST", f"/v1/runs/{run_id}/forward_backward",
                             json={"batch": [{"text": "hello"}], "timeout_s": 0.5}, expect=202)
    started = time.monotonic()
    code, body = harness.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=10")
    assert time.monotonic() - started < 5
    assert code == 503 and body["error"]["code"] == "no_worker"
    assert "no worker can serve base model signal-tiny" in body["error"]["message"]
    run = harness.coordinator.runs[run_id]
    assert run.accum.empty and not harness.coordinator.scheduler.tasks


def test_optim_step_with_nothing_accumulated(harness):
    run_id = _run(harness)
    _, req = harness.request("POST", f"/v1/runs/{run_id}/optim_step", json={}, expect=202)
    code, body = harness.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5")
    assert code == 400 and "call forward_backward before optim_step" in body["error"]["message"]
    assert harness.coordinator.runs[run_id].version == 0


def test_expired_lease_requeues_then_fails_after_max_attempts(tmp_path):
    h = Harness(tmp_path / "data", lease_timeout_s=0.2, max_task_attempts=2)
    try:
        run_id = _run(h)
        worker = FakeWorker(h)
        _, req = h.request("POST", f"/v1/runs/{run_id}/forward_backward",
                           json={"batch": [{"text": "hello"}]}, expect=202)
        first = worker.lease()
        time.sleep(0.3)
        h.coordinator.tick()  # the ticker would do this every TICK_INTERVAL_SEC
        second = worker.lease()
        assert second["task_id"] == first["task_id"] and second["lease_id"] != first["lease_id"]
        time.sleep(0.3)
        h.coordinator.tick()
        code, body = h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5")
        assert code == 500 and body["error"]["code"] == "task_failed"
        assert "failed after 2 attempts" in body["error"]["message"]
        assert "expired" in body["error"]["message"]
        _, metrics = h.request("GET", "/metrics", expect=200)
        assert "signal_tasks_expired_total 2.0" in metrics.decode()
    finally:
        h.close()


def test_models_workers_and_run_listing(harness):
    _, models = harness.request("GET", "/v1/models", expect=200)
    assert "signal-tiny" in [m["model_id"] for m in models["models"]]
    FakeWorker(harness, "gpu-box")
    _, workers = harness.request("GET", "/v1/workers", expect=200)
    assert [w["name"] for w in workers["workers"]] == ["gpu-box"]
    run_id = _run(harness)
    _, info = harness.request("GET", f"/v1/runs/{run_id}", expect=200)
    assert info["version"] == 0 and info["base_model"] == "signal-tiny"
    code, _, = harness.request("GET", f"/v1/runs/{run_id}/weights/0")
    assert code == 200
    assert json.dumps(info)  # plain JSON


def test_weights_are_immutable_and_cacheable(harness):
    run_id = _run(harness)

    async def get():
        resp = await harness.client.get(f"/v1/runs/{run_id}/weights/0")
        return resp.status, resp.headers, await resp.read()

    status, headers, body = harness.call(get())
    assert status == 200
    assert "immutable" in headers["Cache-Control"]
    import hashlib

    assert headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'
    _error(harness, "GET", f"/v1/runs/{run_id}/weights/7", 404)
    _error(harness, "GET", f"/v1/runs/{run_id}/weights/x", 400)

    async def conditional():
        resp = await harness.client.get(f"/v1/runs/{run_id}/weights/0",
                                        headers={"If-None-Match": headers["ETag"]})
        return resp.status

    assert harness.call(conditional()) == 304


def test_stored_keys_and_revocation(tmp_path):
    from rewardsignal.coordinator.store.keys import create_key, key_hash, revoke_key

    db = tmp_path / "data" / "signal.db"
    create_key(db, "carol", "user", key_hash("sk-carol"))
    create_key(db, "dave", "user", key_hash("sk-dave"))
    create_key(db, "fleet", "worker", key_hash("wt-fleet"))
    h = Harness(tmp_path / "data")
    try:
        carol = {"Authorization": "Bearer sk-carol"}
        dave = {"Authorization": "Bearer sk-dave"}
        _error(h, "GET", "/v1/runs", 401)  # stored keys switch auth on
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                           headers=carol, expect=201)
        rid = run["run_id"]
        code, _ = h.request("POST", "/v1/workers/register", json={"name": "w", "device": "cpu"})
        assert code == 401
        # Carol saves state; Dave cannot see it, its files, or the run's weights.
        _, req = h.request("POST", f"/v1/runs/{rid}/save_state", json={"name": "mine"},
                           headers=carol, expect=202)
        h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=10", headers=carol,
                  expect=200)
        h.request("GET", f"/v1/runs/{rid}/artifacts/mine", headers=carol, expect=200)
        _error(h, "GET", f"/v1/runs/{rid}/artifacts/mine", 404, headers=dave)
        _error(h, "GET", f"/v1/runs/{rid}/artifacts/mine/files/adapter_model.safetensors", 404,
               headers=dave)
        _error(h, "GET", f"/v1/requests/{req['request_id']}", 404, headers=dave)
        # Revoked while the coordinator runs: refused from the next request on.
        assert revoke_key(db, "carol")
        assert "revoked" in _error(h, "GET", "/v1/runs", 401, headers=carol)
        h.request("GET", "/v1/runs", headers=dave, expect=200)
    finally:
        h.close()


def test_federated_job_cancel_and_bad_arguments(harness):
    run_id = _run(harness)
    msg = _error(harness, "POST", f"/v1/runs/{run_id}/train_federated", 400,
                 json={"examples": [{"text": "hi"}], "rounds": 2, "aggregator": "krum"})
    assert "aggregator" in msg
    msg = _error(harness, "POST", f"/v1/runs/{run_id}/train_federated", 400,
                 json={"examples": [{"text": "hi"}], "rounds": 1, "tasks_per_round": 2,
                       "min_updates_per_round": 3})
    assert "min_updates_per_round" in msg
    _error(harness, "POST", f"/v1/runs/{run_id}/train_federated", 404,
           json={"dataset_id": "ds-000000000000", "rounds": 1})
    _, req = harness.request("POST", f"/v1/runs/{run_id}/train_federated",
                             json={"examples": [{"text": "hi"}], "rounds": 3,
                                   "round_timeout_s": 30}, expect=202)
    job_id = req["job_id"]
    _, st = harness.request("GET", f"/v1/jobs/{job_id}", expect=200)
    assert st["status"] in ("queued", "running") and st["rounds"] == 3
    _, st = harness.request("POST", f"/v1/jobs/{job_id}/cancel", json={}, expect=200)
    code, done = harness.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=10")
    assert code == 200 and done["result"]["status"] == "cancelled"
    _, st = harness.request("GET", f"/v1/jobs/{job_id}", expect=200)
    assert st["status"] == "cancelled" and st["finished"] and st["version"] is None
    assert harness.coordinator.runs[run_id].version == 0
    assert not harness.coordinator.scheduler.tasks  # its train tasks were withdrawn


def test_optim_step_on_zero_weight_batches_is_a_clear_400(harness):
    h = harness
    run_id = _run(h)
    worker = FakeWorker(h)
    datum = {"model_input": [1, 5, 6], "loss_fn_inputs": {"target_tokens": [5, 6, 2],
                                                          "weights": [0, 0, 0]}}
    _, req = h.request("POST", f"/v1/runs/{run_id}/forward_backward", json={"batch": [datum]},
                       expect=202)
    task = worker.lease()
    import torch

    from rewardsignal.protocol import tensors_to_bytes

    zeros = {k: torch.zeros(s) for k, s in h.coordinator.runs[run_id].shapes.items()}
    code, _ = worker.submit(task, codec="fp32", tensors=tensors_to_bytes(zeros),
                            result={"loss_sum": 0.0, "weight_sum": 0.0, "logprobs": [[-1.0] * 3]})
    assert code == 200
    h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)
    _, req = h.request("POST", f"/v1/runs/{run_id}/optim_step", json={}, expect=202)
    code, body = h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5")
    assert code == 400 and "carry no loss weight" in body["error"]["message"]
    assert h.coordinator.runs[run_id].version == 0



def test_a_request_no_worker_can_take_says_so_then_fails(tmp_path):
    h = Harness(tmp_path / "data", no_worker_grace_s=1.5)
    try:
        run_id = _run(h)
        _, req = h.request("POST", f"/v1/runs/{run_id}/forward_backward",
                           json={"batch": [{"text": "hello"}]}, expect=202)
        code, body = h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=1.2")
        assert code == 202 and body["waiting_for_workers"] is True
        code, body = h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=10")
        assert code == 503 and body["error"]["code"] == "no_worker"
        assert run_id in body["error"]["message"] and "signal-tiny" in body["error"]["message"]
        assert not h.coordinator.scheduler.tasks  # its shards were withdrawn
    finally:
        h.close()


def test_queueing_with_wait_s_answers_with_the_result(harness):
    """``?wait_s``: the queueing call itself waits for the result (one round
    trip); still running after the wait it answers 202 as without; a failure
    comes back as the operation's error; a bad wait_s queues nothing."""
    h = harness
    run_id = _run(h)
    path = f"/v1/runs/{run_id}"
    assert "wait_s" in _error(h, "POST", f"{path}/optim_step?wait_s=soon", 400, json={})
    assert "wait_s" in _error(h, "POST", f"{path}/optim_step?wait_s=-1", 400, json={})
    run = h.coordinator.runs[run_id]
    assert run.version == 0 and run.processor.queue.empty()
    code, failed = h.request("POST", f"{path}/optim_step?wait_s=5", json={})
    assert code == 400 and failed["status"] == "failed"  # as GET /v1/requests/{id} says it
    assert "call forward_backward before optim_step" in failed["error"]["message"]
    worker = FakeWorker(h)
    datum = {"model_input": [1, 5, 6], "loss_fn_inputs": {"target_tokens": [5, 6, 2],
                                                          "weights": [1, 1, 1]}}
    started = time.monotonic()
    _, pending = h.request("POST", f"{path}/forward_backward?wait_s=0.3",
                           json={"batch": [datum]}, expect=202)
    assert time.monotonic() - started >= 0.3 and pending["status"] == "pending"
    task = worker.lease()
    import torch

    from rewardsignal.protocol import tensors_to_bytes

    grads = {k: torch.full(s, 0.1) for k, s in h.coordinator.runs[run_id].shapes.items()}
    code, _ = worker.submit(task, codec="fp32", tensors=tensors_to_bytes(grads),
                            result={"loss_sum": 2.0, "weight_sum": 3.0, "logprobs": [[-1.0] * 3]})
    assert code == 200
    h.request("GET", f"/v1/requests/{pending['request_id']}?timeout_s=5", expect=200)
    _, done = h.request("POST", f"{path}/optim_step?wait_s=5", json={}, expect=200)
    assert done["status"] == "done" and done["result"]["version"] == 1
    assert h.coordinator.runs[run_id].version == 1


def test_answers_are_msgpack_when_asked_and_json_otherwise(harness):
    """A client that sends ``Accept: application/msgpack`` (the SDK) gets the
    same answer as msgpack; one that does not gets JSON. A msgpack body is read
    as its JSON twin would be, and errors are JSON either way."""
    from rewardsignal.protocol import MSGPACK, pack

    h = harness
    run_id = _run(h)
    ask = {"Accept": f"{MSGPACK}, application/json"}
    send = {**ask, "Content-Type": MSGPACK}
    worker = FakeWorker(h)
    datum = {"model_input": [1, 5, 6], "loss_fn_inputs": {"target_tokens": [5, 6, 2]}}
    _, pending = h.request("POST", f"/v1/runs/{run_id}/forward",
                           data=pack({"batch": [datum]}), headers=send, expect=202)
    task = worker.lease()
    assert task["payload"]["datums"][0]["model_input"] == [1, 5, 6]
    logprobs = [[-1.0, -2.5e-8, -0.1]]
    worker.submit(task, result={"loss_sum": 2.0, "weight_sum": 3.0, "logprobs": logprobs})
    path = f"/v1/requests/{pending['request_id']}?timeout_s=5"

    async def raw(headers):
        resp = await h.client.get(path, headers=headers)
        return resp.status, resp.content_type, await resp.read()

    code, ctype, body = h.call(raw(ask))
    assert (code, ctype) == (200, MSGPACK)
    as_msgpack = h.request("GET", path, headers=ask, expect=200)[1]
    as_json = h.request("GET", path, expect=200)[1]
    assert h.call(raw({}))[1] == "application/json"
    assert as_msgpack == as_json and as_msgpack["result"]["logprobs"] == logprobs
    bad = _error(h, "POST", f"/v1/runs/{run_id}/forward", 400, data=pack({"batch": 5}),
                 headers=send)
    assert "batch" in bad
