"""The Tinker routes in process (no workers): bad input gets a clear error and
queues nothing, re-sent calls share a request, and a call waiting for a
worker says so in its queue state."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from apphelpers import Harness
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from rewardsignal.coordinator.tinker.routes import TINKER

PROTO = {"Content-Type": "application/x-protobuf"}


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("tinker") / "data", no_worker_grace_s=600)
    yield harness
    harness.close()


def _post(h, path, body, expect=200):
    return h.request("POST", f"/api/v1/{path}", json=body, expect=expect)[1]


def _result(h, request_id):
    return _post(h, "retrieve_future", {"request_id": request_id})


@pytest.fixture(scope="module")
def model(h):
    session = _post(h, "create_session", {"tags": [], "user_metadata": {}})["session_id"]
    fut = _post(h, "create_model", {"session_id": session, "model_seq_id": 0,
                                    "base_model": "signal-tiny",
                                    "lora_config": {"rank": 2, "train_unembed": False}})
    return session, _result(h, fut["request_id"])["model_id"]


def _fb(model_id: str, seq_id: int, tokens=(1, 2, 3)) -> bytes:
    d = types.Datum(model_input=types.ModelInput.from_ints(list(tokens)), loss_fn_inputs={
        "target_tokens": np.array(list(tokens[1:]) + [4]), "weights": np.ones(len(tokens))})
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[d], loss_fn="cross_entropy"),
        model_id=model_id, seq_id=seq_id)
    return forward_backward_request_to_proto(req).SerializeToString()


@pytest.mark.parametrize("path, body, status, match", [
    ("create_model", {"session_id": "s-nope", "model_seq_id": 1, "base_model": "signal-tiny"},
     404, "unknown session"),
    ("create_model", {"session_id": "SESSION", "model_seq_id": 1, "base_model": "no/such-model",
                      "lora_config": {}}, 404, "no/such-model"),
    ("optim_step", {"model_id": "s-x:train:0", "seq_id": 1, "adam_params": {
        "learning_rate": 1e-3}}, 404, "unknown model"),
    ("optim_step", {"model_id": "MODEL", "seq_id": 1, "adam_params": {"learning_rate": -1}},
     400, "learning_rate"),
    ("save_weights", {"model_id": "MODEL", "seq_id": 1}, 400, "needs a name"),
    ("save_weights", {"model_id": "MODEL", "seq_id": 1, "path": "a/b"}, 400, "checkpoint name"),
    ("load_weights", {"model_id": "MODEL", "seq_id": 1, "path": "s3://x"}, 400, "tinker://"),
    ("load_weights", {"model_id": "MODEL", "seq_id": 1,
                      "path": "tinker://MODEL/weights/never"}, 404, "no checkpoint"),
    ("create_sampling_session", {"session_id": "SESSION", "sampling_session_seq_id": 0}, 400,
     "model_path or base_model"),
    ("asample", {"sampling_session_id": "nope", "seq_id": 0, "num_samples": 1,
                 "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]}}, 404,
     "unknown sampling session"),
])
def test_bad_calls_are_refused_by_name_and_queue_nothing(h, model, path, body, status, match):
    session, model_id = model
    fill = {"SESSION": session, "MODEL": model_id}
    body = {k: (fill.get(v, v) if isinstance(v, str) else v) for k, v in body.items()}
    if "path" in body:
        body["path"] = body["path"].replace("MODEL", model_id)
    answer = _post(h, path, body, expect=status)
    assert match in answer["error"]
    assert h.coordinator.scheduler.counts()["pending"] == 0
    assert all(r.processor.queue.empty() for r in h.coordinator.runs.values())


def test_forward_backward_takes_protobuf_only(h, model):
    _, model_id = model
    status, answer = h.request("POST", "/api/v1/forward_backward", json={"model_id": model_id},
                               expect=400)
    assert "protobuf" in answer["error"]
    status, answer = h.request("POST", "/api/v1/forward_backward", data=b"\xff\x01garbage",
                               headers=PROTO, expect=400)
    assert "ForwardBackwardRequest" in answer["error"]


def test_stable_reinforce_is_refused_with_the_losses_there_are(h, model):
    _, model_id = model
    msg = forward_backward_request_to_proto(types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[types.Datum(
            model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs={
                "target_tokens": np.array([2, 3])})], loss_fn="stable_reinforce"),
        model_id=model_id, seq_id=1))
    _, answer = h.request("POST", "/api/v1/forward_backward", data=msg.SerializeToString(),
                          headers=PROTO, expect=400)
    assert "stable_reinforce" in answer["error"] and "importance_sampling" in answer["error"]


def test_resends_share_a_request_and_a_waiting_call_says_why(h, model):
    _, model_id = model
    first = h.request("POST", "/api/v1/forward_backward", data=_fb(model_id, 1), headers=PROTO,
                      expect=200)[1]["request_id"]
    again = h.request("POST", "/api/v1/forward_backward", data=_fb(model_id, 1), headers=PROTO,
                      expect=200)[1]["request_id"]
    assert again == first
    tk = h.app[TINKER]
    assert tk.queue_state("local", first)["queue_state"] == "active"
    for _ in range(100):  # the operation starts, and finds no worker at its next check (1 s)
        h.call(asyncio.sleep(0.1))
        if tk.queue_state("local", first)["queue_state"] != "active":
            break
    state = tk.queue_state("local", first)
    assert state["queue_state"] == "paused_capacity"
    assert "signal-worker" in state["queue_state_reason"]
    assert h.coordinator.scheduler.counts()["pending"] == 1  # queued once, not twice
