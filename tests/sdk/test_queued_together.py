"""The SDK's ``forward_backward_optim_step`` against stand-in coordinators: one
call to ``/requests`` and its answer's states (done, failed, still pending),
and a coordinator from before that route (one call after another)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from rewardsignal.errors import ValidationError
from rewardsignal.sdk.client import AsyncSignalClient


def _step(routes: dict, calls: list, times: int = 1) -> tuple[dict, dict]:
    """Run the pipelined call ``times`` against an app of ``routes`` (op ->
    answer, "wait" -> a request id's answer); ``calls`` gets (method, what) in
    order. The last call's results."""
    async def op(request: web.Request) -> web.Response:
        name = request.match_info["op"]
        calls.append(("POST", name, msgpack.unpackb(await request.read())))  # the SDK's body
        body, status = routes[name]
        return web.json_response(body, status=status)

    async def wait(request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        calls.append(("GET", rid, None))
        return web.json_response(routes["wait"][rid])

    async def go() -> tuple[dict, dict]:
        app = web.Application()
        app.router.add_post("/v1/runs/{run_id}/{op}", op)
        app.router.add_get("/v1/requests/{rid}", wait)
        async with TestServer(app, host="127.0.0.1") as server:
            async with AsyncSignalClient(base_url=str(server.make_url(""))) as client:
                for _ in range(times):
                    out = await asyncio.wait_for(client.run("run-1").forward_backward_optim_step(
                        [{"text": "a"}], learning_rate=0.01, timeout_s=5), 30)
                return out

    return asyncio.run(go())


DONE_FB = {"request_id": "r-fb", "status": "done", "result": {"loss": 1.5}}
DONE_STEP = {"request_id": "r-step", "status": "done", "result": {"version": 1}}


def test_the_pair_is_one_call_and_its_answer_brings_both_results():
    calls: list = []
    fb, step = _step({"requests": ({"requests": [DONE_FB, DONE_STEP]}, 200)}, calls)
    assert (fb, step) == ({"loss": 1.5}, {"version": 1})
    assert len(calls) == 1
    _, name, body = calls[0]
    assert name == "requests" and [r["op"] for r in body["requests"]] == [
        "forward_backward", "optim_step"]
    assert body["requests"][1]["args"]["learning_rate"] == 0.01


def test_a_pending_one_is_waited_on_and_a_failed_one_raises_its_error():
    calls: list = []
    pending = {"request_id": "r-step", "status": "pending"}
    fb, step = _step({"requests": ({"requests": [DONE_FB, pending]}, 202),
                      "wait": {"r-step": DONE_STEP}}, calls)
    assert step == {"version": 1} and [c[:2] for c in calls] == [("POST", "requests"),
                                                                  ("GET", "r-step")]
    failed = {"request_id": "r-fb", "status": "failed",
              "error": {"code": "invalid_request", "message": "loss weights are all zero"}}
    with pytest.raises(ValidationError, match="loss weights are all zero"):
        _step({"requests": ({"requests": [failed, pending]}, 200)}, [])


OLD = {"error": {"code": "not_found",
                 "message": "unknown operation 'requests'; expected one of [...]"}}
PENDING_FB = ({"request_id": "r-fb", "status": "pending"}, 202)


def test_a_coordinator_without_the_route_gets_the_calls_one_after_another():
    calls: list = []
    fb, step = _step({"requests": (OLD, 404), "forward_backward": PENDING_FB,
                      "optim_step": ({"request_id": "r-step", "status": "pending"}, 202),
                      "wait": {"r-fb": DONE_FB, "r-step": DONE_STEP}}, calls, times=2)
    assert (fb, step) == ({"loss": 1.5}, {"version": 1})
    # Each queued once the one before is accepted, then both awaited; the
    # missing route is asked for once per client.
    assert [c[:2] for c in calls[:3]] == [("POST", "requests"), ("POST", "forward_backward"),
                                          ("POST", "optim_step")]
    assert sorted(c[:2] for c in calls[3:5]) == [("GET", "r-fb"), ("GET", "r-step")]
    assert [c[:2] for c in calls[5:7]] == [("POST", "forward_backward"), ("POST", "optim_step")]
    # A step refused at the door raises at once, whatever the batch is doing.
    refused = {"error": {"code": "invalid_request", "message": "field 'learning_rate'"}}
    with pytest.raises(ValidationError, match="learning_rate"):
        _step({"requests": (OLD, 404), "forward_backward": PENDING_FB,
               "optim_step": (refused, 400), "wait": {}}, [])
    # Any other 404 is the caller's error, not a reason to fall back.
    gone = {"error": {"code": "not_found", "message": "unknown run run-1"}}
    with pytest.raises(Exception, match="unknown run run-1"):
        _step({"requests": (gone, 404)}, [])
