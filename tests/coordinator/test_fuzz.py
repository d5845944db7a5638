"""Random and mutated requests at every route: never a 5xx, every error is JSON
naming a code, a refused request changes nothing, the coordinator stays healthy."""

from __future__ import annotations

import json

import pytest
from apphelpers import FakeWorker, Harness
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rewardsignal.protocol import MSGPACK, pack

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12),
                                                                        children, max_size=4),
    max_leaves=12)

VALID = {
    "/v1/runs": {"base_model": "signal-tiny", "lora_r": 2},
    "forward_backward": {"batch": [{"text": "hi"}], "loss_fn": "cross_entropy"},
    "forward": {"batch": [{"input": "a", "output": "b"}]},
    "optim_step": {"learning_rate": 1e-3, "beta1": 0.9},
    "sample": {"prompts": ["hi"], "max_tokens": 4, "temperature": 0.0},
    "save_state": {"mode": "adapter", "name": "x"},
    "train_federated": {"examples": [{"text": "hi"}], "rounds": 1},
    "register": {"name": "w", "device": "cpu", "max_tokens_per_task": 100},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    h = Harness(tmp_path_factory.mktemp("fuzz") / "data", max_body_bytes=64 * 1024)
    _, run = h.request("POST", "/v1/runs", json=VALID["/v1/runs"], expect=201)
    worker = FakeWorker(h)
    yield h, run["run_id"], worker
    h.close()


def _snapshot(h: Harness) -> tuple:
    """State a request could change. Queues and tasks are left out: operations
    accepted by earlier examples move through them in the background."""
    c = h.coordinator
    return (tuple(sorted((r.run_id, r.version, r.accum.calls, tuple(sorted(r.adapter)))
                         for r in c.runs.values())),
            len(c.scheduler.workers), len(c.jobs), len(c.requests._items),
            len(list(c.services.datasets.root.glob("*.jsonl"))) if c.services.datasets.root.exists() else 0)


def _mutate(valid: dict, key, value) -> dict:
    body = dict(valid)
    if key is None or not body:
        return body
    k = sorted(body)[key % len(body)]
    body[k] = value
    return body


def _routes(run_id: str, worker_id: str) -> list[tuple[str, str, str | None]]:
    ops = ("forward_backward", "forward", "optim_step", "sample", "save_state",
           "train_federated")
    return ([("POST", "/v1/runs", "/v1/runs"), ("GET", "/v1/runs", None),
             ("GET", f"/v1/runs/{run_id}", None), ("GET", "/v1/models", None),
             ("GET", "/v1/workers", None), ("GET", "/v1/status", None),
             ("POST", "/v1/datasets", None), ("GET", "/v1/jobs/job-000000000000", None),
             ("POST", "/v1/jobs/job-000000000000/cancel", None),
             ("GET", f"/v1/runs/{run_id}/weights/0", None),
             ("GET", f"/v1/runs/{run_id}/artifacts/nope", None),
             ("GET", "/v1/requests/req-0", None),
             ("POST", "/v1/workers/register", "register"),
             ("POST", f"/v1/workers/{worker_id}/heartbeat", None),
             ("POST", "/v1/tasks/t-0/result", None)]
            + [("POST", f"/v1/runs/{run_id}/{op}", op) for op in ops])


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.generate], derandomize=True, database=None)
@given(route=st.integers(0, 100), mode=st.sampled_from(["mutate", "random", "bytes",
                                                        "msgpack", "empty"]),
       key=st.none() | st.integers(0, 10), value=JSON_VALUES, raw=st.binary(max_size=200))
def test_fuzz_every_route(world, route, mode, key, value, raw):
    h, run_id, worker = world
    routes = _routes(run_id, worker.worker_id)
    method, path, valid_key = routes[route % len(routes)]
    headers = {"Content-Type": "application/json"}
    if mode == "mutate" and valid_key:
        data = json.dumps(_mutate(VALID[valid_key], key, value), allow_nan=True).encode()
    elif mode == "random":
        data = json.dumps(value, allow_nan=True).encode()
    elif mode == "msgpack":
        headers = {"Content-Type": MSGPACK}
        try:
            data = pack(value)
        except (OverflowError, ValueError):
            data = raw
    elif mode == "bytes":
        data = raw
    else:
        data = b""
    before = _snapshot(h)
    status, body = h.request(method, path, data=data if method == "POST" else None,
                             headers=headers)
    assert status < 500, (method, path, data[:200], body)
    if status >= 400:
        assert isinstance(body, dict) and set(body["error"]) == {"code", "message"}, body
        assert _snapshot(h) == before, (method, path, data[:200], body)
    h.request("GET", "/healthz", expect=200)
