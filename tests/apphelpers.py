"""An in-process coordinator (aiohttp TestServer) and a fake worker speaking the
real protocol, for tests of the HTTP surface and the aggregator's checks."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from rewardsignal.coordinator.app import make_app
from rewardsignal.coordinator.config import CoordinatorConfig
from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.protocol import FRAMES, MSGPACK, RESULT, pack, pack_result, unpack


def new_scheduler(**kw) -> Scheduler:
    """A scheduler on its own, with the tests' defaults (30 s leases, 3 attempts,
    100-token tasks, stragglers re-leased after 60 s); ``kw`` overrides any."""
    args = dict(lease_timeout_s=30, max_attempts=3, default_task_tokens=100,
                straggler_factor=3.0, straggler_min_s=60, quarantine_after=5, quarantine_s=60)
    return Scheduler(**(args | kw))


class Harness:
    """Drives one app from sync tests: ``h.call(coro)`` runs on its loop."""

    def __init__(self, data_dir: Path, **config) -> None:
        self.loop = asyncio.new_event_loop()
        cfg = CoordinatorConfig(data_dir=data_dir, **{"max_task_attempts": 100,
                                                      "quarantine_after": 1000, **config})
        self.app = make_app(cfg)
        self.client = TestClient(TestServer(self.app), loop=self.loop)
        self.call(self.client.start_server())

    def call(self, coro):
        return self.loop.run_until_complete(coro)

    @property
    def coordinator(self):
        from rewardsignal.coordinator.api.appkeys import COORDINATOR

        return self.app[COORDINATOR]

    def request(self, method: str, path: str, *, json=None, data=None, headers=None,
                expect: int | None = None):
        async def go():
            resp = await self.client.request(method, path, json=json, data=data,
                                             headers=headers or {})
            body = await resp.read()
            ctype = resp.content_type
            return resp.status, body, ctype

        status, body, ctype = self.call(go())
        import json as _json

        if ctype == "application/json" and body:
            parsed = _json.loads(body)
        elif ctype == MSGPACK:
            parsed = unpack(body, max_bytes=1 << 30)
        else:
            parsed = body
        if expect is not None:
            assert status == expect, (status, parsed)
        return status, parsed

    def close(self) -> None:
        self.call(self.client.close())
        self.loop.close()


class FakeWorker:
    def __init__(self, h: Harness, name: str = "fake", *, token: str | None = None,
                 **register) -> None:
        """``register``: more fields of the registration body (``precisions``,
        ``memory_bytes``, ``device``); ``token``: its worker token."""
        self.h = h
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        _, body = h.request("POST", "/v1/workers/register", expect=201, headers=self.headers,
                            json={"name": name, "device": "cpu", "max_tokens_per_task": 100000,
                                  **register})
        self.worker_id = body["worker_id"]
        self.result_types = body.get("result_types", [])

    def lease(self, timeout_s: float = 2.0):
        status, body = self.h.request("POST", f"/v1/workers/{self.worker_id}/lease?timeout_s="
                                      f"{timeout_s}", headers=self.headers)
        return body if status == 200 else None

    def submit(self, task: dict, *, as_result: bool = False, **fields):
        """``as_result``: the tensors after the map (``protocol.RESULT``), not in it."""
        msg = {"worker_id": self.worker_id, "lease_id": task["lease_id"],
               "fingerprint": task["fingerprint"], "version": task["version"], **fields}
        msg = {k: v for k, v in msg.items() if v is not DROP}
        body, kind = (pack_result(msg), RESULT) if as_result else (pack(msg), MSGPACK)
        return self.h.request("POST", f"/v1/tasks/{task['task_id']}/result", data=body,
                              headers={"Content-Type": kind, **self.headers})


DROP = object()  # a field value meaning: leave this field out




def computed_fb(h: Harness, task: dict) -> dict:
    """A forward_backward task's computed fields: a small gradient of the run's
    shapes and the result."""
    import torch

    from rewardsignal.protocol import tensors_to_bytes

    grads = {k: torch.full(s, 0.01) for k, s in h.coordinator.runs[task["run_id"]].shapes.items()}
    lp = [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]
    return {"codec": "fp32", "tensors": tensors_to_bytes(grads), "duration_s": 0.1,
            "result": {"loss_sum": 1.0, "weight_sum": 2.0, "logprobs": lp}}


def fb_result(h: Harness, worker: FakeWorker, task: dict, **extra) -> bytes:
    """``worker``'s result of a forward_backward task as a body
    (``protocol.RESULT``): ``computed_fb``'s fields and ``extra``."""
    return pack_result({"worker_id": worker.worker_id, "lease_id": task["lease_id"],
                        "fingerprint": task["fingerprint"], "version": task["version"],
                        **computed_fb(h, task), **extra})


def leased_forward_backward(h: Harness, worker: FakeWorker, run_id: str) -> tuple[dict, dict]:
    """A one-example forward_backward queued on ``run_id`` (its 202 answer) and
    its task, as ``worker`` leases it."""
    _, queued = h.request("POST", f"/v1/runs/{run_id}/forward_backward",
                          json={"batch": [{"text": "one"}]}, expect=202)
    return queued, worker.lease()


def new_run(h: Harness, **fields) -> str:
    """A signal-tiny run (LoRA r=2 unless ``fields`` say otherwise); its id."""
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2,
                                                 **fields}, expect=201)
    return run["run_id"]


def fake_step(h: Harness, worker: FakeWorker, run_id: str, *, loss_sum: float = 1.0,
              weight_sum: float = 2.0, as_result: bool = False) -> None:
    """One forward_backward + optim_step, the fake worker submitting a small
    gradient of the right shapes."""
    fake_gradient(h, worker, run_id, loss_sum=loss_sum, weight_sum=weight_sum,
                  as_result=as_result)
    _, req = h.request("POST", f"/v1/runs/{run_id}/optim_step", json={}, expect=202)
    h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)


def fake_gradient(h: Harness, worker: FakeWorker, run_id: str, *, loss_sum: float = 1.0,
                  weight_sum: float = 2.0, as_result: bool = False) -> None:
    """One forward_backward, the fake worker submitting a small gradient of the
    right shapes."""
    import torch

    from rewardsignal.protocol import tensors_to_bytes

    _, req = h.request("POST", f"/v1/runs/{run_id}/forward_backward",
                       json={"batch": [{"text": "hello"}]}, expect=202)
    task = worker.lease()
    grads = {k: torch.full(s, 0.01) for k, s in h.coordinator.runs[run_id].shapes.items()}
    lp = [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]
    code, _ = worker.submit(task, as_result=as_result, codec="fp32",
                            tensors=tensors_to_bytes(grads),
                            result={"loss_sum": loss_sum, "weight_sum": weight_sum,
                                    "logprobs": lp}, duration_s=0.5)
    assert code == 200
    h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)


def requests_to(h: Harness, route: str) -> float:
    """Requests to ``route`` so far (a route as the coordinator names it in
    ``signal_http_request_duration_seconds``, e.g. ``/v1/workers/{worker_id}/lease``),
    worker channel exchanges included."""
    return sum(requests_by_method(h, route).values())


def requests_by_method(h: Harness, route: str) -> dict[str, float]:
    """``requests_to`` by method (``WS``: exchanges on a worker channel)."""
    text = h.request("GET", "/metrics", expect=200)[1]
    text = text.decode() if isinstance(text, bytes) else str(text)
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("signal_http_request_duration_seconds_count") \
                and f'route="{route}"' in line:
            method = line.split('method="', 1)[1].split('"', 1)[0]
            counts[method] = counts.get(method, 0) + float(line.rsplit(" ", 1)[1])
    return counts


async def frames(resp):
    """Every frame of a streamed lease (``protocol.FRAMES``), as it arrives."""
    assert resp.status == 200 and resp.content_type == FRAMES, resp.status
    while True:
        try:
            head = await resp.content.readexactly(4)
        except asyncio.IncompleteReadError as exc:
            assert not exc.partial
            return
        yield unpack(await resp.content.readexactly(int.from_bytes(head, "big")),
                     max_bytes=1 << 30)


async def answer(resp) -> tuple[int, dict]:
    """An in-process response's status and body (msgpack or JSON; {} if empty)."""
    body = await resp.read()
    return resp.status, (unpack(body, max_bytes=1 << 30) if resp.content_type == MSGPACK
                         else (await resp.json() if body else {}))


async def submit_shard(h: Harness, worker_id: str, run_id: str, value: float = 0.01) -> int:
    """From a running loop: lease one task and submit a gradient of the run's
    shapes (every element ``value``, weight sum 2); the submission's status."""
    import torch

    from rewardsignal.protocol import tensors_to_bytes

    c = h.client
    status, task = await answer(await c.post(f"/v1/workers/{worker_id}/lease?timeout_s=5"))
    assert status == 200, (status, task)
    grads = {k: torch.full(s, value) for k, s in h.coordinator.runs[run_id].shapes.items()}
    msg = {"worker_id": worker_id, "lease_id": task["lease_id"],
           "fingerprint": task["fingerprint"], "version": task["version"], "codec": "fp32",
           "tensors": tensors_to_bytes(grads), "duration_s": 0.1,
           "result": {"loss_sum": 1.0, "weight_sum": 2.0,
                      "logprobs": [[-1.0] * len(d["model_input"])
                                   for d in task["payload"]["datums"]]}}
    resp = await c.post(f"/v1/tasks/{task['task_id']}/result", data=pack(msg),
                        headers={"Content-Type": MSGPACK})
    return resp.status


def real_worker_steps(h: Harness, run_id: str, steps: int, *, between=None, **config):
    """A real worker process loop (``Worker``, in this process) against the
    harness's coordinator, serving ``steps`` forward_backward requests of
    ``run_id`` sent one after the other, then stopping (``max_tasks``); the worker.
    ``between(i)``: awaited after step ``i``; ``config``: more ``WorkerConfig``."""
    from rewardsignal.worker.loop import Worker, WorkerConfig

    url = str(h.client.make_url("")).rstrip("/")
    worker = Worker(WorkerConfig(coordinator=url, device="cpu", max_tasks=steps, **config))

    async def go() -> None:
        running = asyncio.ensure_future(worker.run())
        for i in range(steps):
            resp = await h.client.post(f"/v1/runs/{run_id}/forward_backward?wait_s=60",
                                       json={"batch": [{"text": f"step {i}"}]})
            assert resp.status == 200, await resp.text()
            if between is not None:
                await between(i)
        assert await asyncio.wait_for(running, 60) == 0

    h.call(go())
    return worker
