"""Run endpoints: create, list, read; queue an operation (any the registry
knows); saved states; weights (for users and for workers holding a lease)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from rewardsignal.coordinator import ops
from rewardsignal.coordinator.api.appkeys import AUTH, COORDINATOR, METRICS
from rewardsignal.coordinator.api.bodies import (
    MAX_WAIT_S,
    idempotency_key,
    query_float,
    read_body,
    reply,
)
from rewardsignal.coordinator.api.jobs import request_state
from rewardsignal.coordinator.coordinator import Coordinator
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.runs.create import read_run_request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.errors import NotFoundError, SignalError, ValidationError, http_status_for

# Operations one ``POST /v1/runs/{run_id}/requests`` queues at most.
MAX_QUEUED_TOGETHER = 64


async def create_run(request: web.Request) -> web.Response:
    owner = await request.app[AUTH].user(request)
    coord = request.app[COORDINATOR]
    key = idempotency_key(request)

    async def create() -> dict:
        b = Body(await read_body(request))
        cfg = coord.config
        run_request = await asyncio.to_thread(read_run_request, b, cfg.models,
                                              log_to=cfg.log_to,
                                              wandb_project=cfg.wandb_project)
        run = await coord.create_run(owner, run_request, key)
        return {**run.to_json(), "warnings": coord.placement_warnings(run)}

    answer, replayed = await coord.once(owner, key, create, kind="run")
    return _answer(request, answer, 201, replayed)


def _answer(request: web.Request, body: dict, status: int, replayed: bool) -> web.Response:
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return reply(request, body, status=status, headers=headers)


async def list_runs(request: web.Request) -> web.Response:
    owner = await request.app[AUTH].user(request)
    runs = request.app[COORDINATOR].runs_of(owner)
    return web.json_response({"runs": [r.to_json() for r in runs]})


async def get_run(request: web.Request) -> web.Response:
    owner = await request.app[AUTH].user(request)
    run = request.app[COORDINATOR].run_for(owner, request.match_info["run_id"])
    return web.json_response(run.to_json())


async def delete_run(request: web.Request) -> web.Response:
    """DELETE /v1/runs/{run_id}: the run, its checkpoints, saved states, pending
    requests and gradients, jobs and metric series. Not undoable."""
    owner = await request.app[AUTH].user(request)
    answer = await request.app[COORDINATOR].delete_run(owner, request.match_info["run_id"])
    return web.json_response(answer)


async def list_artifacts(request: web.Request) -> web.Response:
    owner = await request.app[AUTH].user(request)
    coord = request.app[COORDINATOR]
    run = coord.run_for(owner, request.match_info["run_id"])
    metas = await asyncio.to_thread(coord.services.artifacts.list, run.run_id)
    return web.json_response({"artifacts": metas})


async def run_op(request: web.Request) -> web.Response:
    """POST /v1/runs/{run_id}/{op}: check the arguments now (a bad request changes
    nothing), queue the operation, answer 202 with a request id to wait on.
    ``?wait_s=S``: first wait up to S seconds for the request to finish, and
    answer as ``GET /v1/requests/{id}`` would (200 with the result when it did):
    one round trip for a call the client waits on anyway."""
    owner = await request.app[AUTH].user(request)
    wait_s = query_float(request, "wait_s", 0.0, MAX_WAIT_S)
    coord = request.app[COORDINATOR]
    operation = ops.get(request.match_info["op"])
    run = coord.run_for(owner, request.match_info["run_id"])
    key = idempotency_key(request)

    async def parse() -> tuple[Any, float | None]:
        b = Body(await read_body(request))
        timeout_s = b.float("timeout_s", None, lo=0, lo_open=True, hi=7 * 86400)
        args = await operation.parse(coord.services, run, owner, b)
        b.done()
        return args, timeout_s

    async def accept(parsed: tuple[Any, float | None]) -> dict:
        args, timeout_s = parsed
        return await coord.submit(owner, run, operation, args, timeout_s, key)

    answer, replayed = await coord.once(owner, key, accept, kind="request", prepare=parse)
    if wait_s > 0:
        body = await _state_after(coord, answer["request_id"], owner, wait_s)
        if body["status"] == "failed":
            return web.json_response(body, status=http_status_for(body["error"]["code"]))
        if body["status"] == "done":
            return _answer(request, {**answer, **body}, 200, replayed)
        answer = {**answer, **body}  # still pending, and why (waiting_for_workers)
    return _answer(request, answer, 202, replayed)


async def run_requests(request: web.Request) -> web.Response:
    """POST /v1/runs/{run_id}/requests: several operations queued in one call,
    in their order, all or none (``Coordinator.submit_all``): ``{"requests":
    [{"op": name, "args": {...}}, ...], "timeout_s": S}``, each ``args`` what its
    own ``POST /v1/runs/{run_id}/{op}`` takes and checked the same way; one bad
    one and nothing is queued (400 naming it). Answers ``{"requests": [...]}``,
    each one's 202 answer. ``?wait_s=S``: first wait up to S seconds for them to
    finish, and give each one's state as ``GET /v1/requests/{id}`` would (200
    once every one has finished, done or failed; 202 while one is pending). The
    usual training step, ``forward_backward`` then ``optim_step``, is one round
    trip and one database sync this way."""
    owner = await request.app[AUTH].user(request)
    wait_s = query_float(request, "wait_s", 0.0, MAX_WAIT_S)
    coord = request.app[COORDINATOR]
    run = coord.run_for(owner, request.match_info["run_id"])
    key = idempotency_key(request)

    async def parse() -> tuple[list, float | None]:
        b = Body(await read_body(request))
        timeout_s = b.float("timeout_s", None, lo=0, lo_open=True, hi=7 * 86400)
        items = b.list("requests", max_len=MAX_QUEUED_TOGETHER)
        b.done()
        if not items:
            raise ValidationError("field 'requests' must list at least one operation")
        return [await _pipelined(coord, run, owner, i, item)
                for i, item in enumerate(items)], timeout_s

    async def accept(parsed: tuple[list, float | None]) -> dict:
        steps, timeout_s = parsed
        return {"requests": await coord.submit_all(owner, run, steps, timeout_s, key)}

    # The body is read and checked while the key is looked up.
    answer, replayed = await coord.once(owner, key, accept, kind="requests", prepare=parse)
    if wait_s <= 0:
        return _answer(request, answer, 202, replayed)
    deadline = asyncio.get_running_loop().time() + wait_s
    states = []
    for queued in answer["requests"]:
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        state = await _state_after(coord, queued["request_id"], owner, left)
        if state["status"] == "pending":  # out of time, or news for the client: answer now
            deadline = 0.0
        states.append({**queued, **state})
    finished = all(s["status"] != "pending" for s in states)
    return _answer(request, {"requests": states}, 200 if finished else 202, replayed)


async def _state_after(coord: Coordinator, request_id: str, owner: str, wait_s: float
                       ) -> dict:
    """A just-queued request's state after waiting up to ``wait_s`` for it
    (``request_state``); pending if it was forgotten meanwhile (the answer of
    its queueing stands, and the client waits on it)."""
    try:
        return await request_state(coord, request_id, owner, wait_s)
    except NotFoundError:
        return {"status": "pending"}


async def _pipelined(coord: Coordinator, run: Run, owner: str, i: int, item: object
                     ) -> tuple[ops.Operation, object]:
    """One ``requests`` item: its operation and checked arguments."""
    name = None
    try:
        b = Body(item, f"requests[{i}]")
        name = b.str("op")
        args = Body(b.dict("args", {}), f"requests[{i}].args")
        b.done()
        try:
            operation = ops.get(name)
        except NotFoundError as exc:  # a bad item, not a missing resource
            raise ValidationError(exc.message) from None
        if not operation.pipelined:
            raise ValidationError(f"{name} is not queued with other operations; send it on "
                                  f"its own (POST /v1/runs/{{run_id}}/{name})")
        parsed = await operation.parse(coord.services, run, owner, args)
        args.done()
    except SignalError as exc:  # as its own route would answer, naming the item
        exc.message = f"requests[{i}]{f' ({name})' if name else ''}: {exc.message}"
        exc.args = (exc.message,)
        raise
    return operation, parsed


async def get_artifact(request: web.Request) -> web.Response:
    owner = await request.app[AUTH].user(request)
    coord = request.app[COORDINATOR]
    run = coord.run_for(owner, request.match_info["run_id"])
    meta, _ = await asyncio.to_thread(coord.services.artifacts.get, run.run_id,
                                      request.match_info["name"])
    return web.json_response(meta)


async def get_artifact_file(request: web.Request) -> web.StreamResponse:
    owner = await request.app[AUTH].user(request)
    coord = request.app[COORDINATOR]
    run = coord.run_for(owner, request.match_info["run_id"])
    path, size = await asyncio.to_thread(coord.services.artifacts.file, run.run_id,
                                         request.match_info["name"],
                                         request.match_info["filename"])
    request.app[METRICS].bytes_out.labels("artifact").inc(size)
    return web.FileResponse(path)


async def _check_weights_access(request: web.Request, run_id: str) -> None:
    coord = request.app[COORDINATOR]
    worker_id = request.headers.get("X-Signal-Worker")
    if worker_id:
        await request.app[AUTH].worker(request)
        w = coord.scheduler.worker(worker_id)
        if not coord.scheduler.holds_lease(w.worker_id, run_id) or run_id not in coord.runs:
            raise NotFoundError(f"unknown run {run_id} (no lease of this worker needs it)")
    else:
        coord.run_for(await request.app[AUTH].user(request), run_id)


async def get_weights(request: web.Request) -> web.StreamResponse:
    """Immutable per version: users (their own runs) and workers (runs they hold
    a lease on). Streamed, not ``web.Response(body=...)``: aiohttp keeps a
    connection's last response alive while the connection idles, and a Response
    would pin its body."""
    run_id = request.match_info["run_id"]
    try:
        version = int(request.match_info["version"])
    except ValueError:
        raise ValidationError("version must be an integer") from None
    await _check_weights_access(request, run_id)
    versions = request.app[COORDINATOR].services.versions
    # A content-hash ETag (not aiohttp's mtime-based one) so caches agree across
    # coordinator restarts, restores from backup and replicas.
    etag = '"' + await versions.adapter_sha256(run_id, version) + '"'
    headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    file = versions.adapter_file(run_id, version)
    # A recent version is served from memory: its checkpoint may still be being
    # written in the background.
    body = versions.adapter_bytes(run_id, version)
    if body is None:
        await versions.flush(run_id)  # not in memory: its checkpoint must have landed
        if not await asyncio.to_thread(file.is_file):
            # A version between two background checkpoints was never written.
            raise NotFoundError(f"run {run_id} has no weights for version {version} on disk "
                                "(only some versions are checkpointed); ask for a newer one")
    resp = web.StreamResponse(headers=headers)
    resp.content_type = "application/vnd.safetensors"
    if request.method == "HEAD":
        resp.content_length = (len(body) if body is not None
                               else (await asyncio.to_thread(file.stat)).st_size)
        await resp.prepare(request)
        return resp
    if body is None:
        body = await asyncio.to_thread(file.read_bytes)
    request.app[METRICS].bytes_out.labels("weights").inc(len(body))
    resp.content_length = len(body)
    await resp.prepare(request)
    await resp.write(body)
    await resp.write_eof()
    return resp
