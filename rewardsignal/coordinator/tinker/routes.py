"""The Tinker HTTP front end: ``/api/v1/...`` as the ``tinker`` SDK speaks it.

Handlers parse, call the ``TinkerFrontEnd``, and encode; the table of every
endpoint and what Signal does with it is in ``docs/tinker.md``. Errors are
JSON with a body (the SDK retries a bodiless 400 as a proxy fault), and a
conflict is a 400, since the SDK retries 409s for minutes.
"""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web

from rewardsignal.coordinator.api.appkeys import AUTH, COORDINATOR
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.tinker import wire
from rewardsignal.coordinator.tinker.frontend import TinkerFrontEnd
from rewardsignal.coordinator.tinker.futures import error_result
from rewardsignal.errors import ConflictError, NotFoundError, SignalError, ValidationError
from rewardsignal.models import BUILTIN_MODELS

log = logging.getLogger("signal.tinker")
TINKER = web.AppKey("tinker", TinkerFrontEnd)
PREFIX = "/api/v1"
# How long retrieve_future holds a poll before answering try_again (the SDK
# polls again at once, with a 45 s client timeout).
HOLD_S = 30.0
PROTOBUF = "application/x-protobuf"


async def _json(request: web.Request) -> Body:
    try:
        data = await request.json() if request.can_read_body else {}
    except json.JSONDecodeError as exc:
        raise ValidationError(f"body is not JSON: {exc}") from None
    return Body(data)


def _errors(handler):
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConflictError as exc:
            return web.json_response({"error": exc.message, "detail": exc.message}, status=400)
        except SignalError as exc:
            return web.json_response({"error": exc.message, "detail": exc.message},
                                     status=exc.http_status)

    return wrapped


async def _ctx(request: web.Request) -> tuple[str, TinkerFrontEnd]:
    return await request.app[AUTH].user(request), request.app[TINKER]


def _future(request_id: str, **extra: object) -> web.Response:
    return web.json_response({"request_id": request_id, **extra})


# -- client setup and sessions ------------------------------------------------------------
async def client_config(request: web.Request) -> web.Response:
    await request.app[AUTH].user(request)
    return web.json_response({"pjwt_auth_enabled": False, "proto_compress_fwdbwd": False,
                              "sample_use_retrieve_futures": False,
                              "custom_loss_server_side": False})


async def dynamic_config(request: web.Request) -> web.Response:
    await request.app[AUTH].user(request)
    return web.json_response({"sample_cancel_enabled": False})


async def capabilities(request: web.Request) -> web.Response:
    await request.app[AUTH].user(request)
    return web.json_response({"supported_models": [
        {"model_name": name, "max_context_length": m.max_position_embeddings,
         "trainable": True, "sampleable": True} for name, m in BUILTIN_MODELS.items()]})


async def create_session(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return web.json_response({"type": "create_session",
                              "session_id": await tk.create_session(owner)})


async def heartbeat(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    tk.session(owner, (await _json(request)).str("session_id"))
    return web.json_response({"type": "session_heartbeat"})


async def telemetry(request: web.Request) -> web.Response:
    await request.app[AUTH].user(request)
    return web.json_response({"status": "accepted"})  # accepted and dropped


async def finish_session(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    sid = tk.session(owner, request.match_info["session_id"])
    body = await _json(request)
    reason = body.dict("reason", {}).get("type")
    log.info("tinker session finished id=%s reason=%s", sid, reason)
    return web.json_response({})


async def get_session(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    sid = tk.session(owner, request.match_info["session_id"])
    return web.json_response({
        "training_run_ids": [m for m in tk.models if m.startswith(sid + ":")],
        "sampler_ids": [s for s in tk.sampling.samplers if s.startswith(sid + ":")]})


# -- training -----------------------------------------------------------------------------
async def create_model(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return _future(await tk.create_model(owner, await _json(request)))


async def get_info(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return web.json_response(tk.info(owner, (await _json(request)).str("model_id")))


async def forward_backward(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    if request.headers.get("Content-Encoding", "identity") != "identity":
        raise ValidationError("compressed bodies are not accepted (client/config turns "
                              "proto_compress_fwdbwd off)")
    if PROTOBUF not in request.headers.get("Content-Type", ""):
        raise ValidationError(f"forward_backward takes a protobuf body ({PROTOBUF})")
    call = wire.read_forward_backward(await request.read())
    return _future(await tk.forward_backward(owner, call), model_id=call.model_id)


async def optim_step(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return _future(await tk.optim_step(owner, await _json(request)))


async def save_weights(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return _future(await tk.save(owner, await _json(request), for_sampler=False))


async def save_for_sampler(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return _future(await tk.save(owner, await _json(request), for_sampler=True))


async def load_weights(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return _future(await tk.load(owner, await _json(request)))


# -- sampling -----------------------------------------------------------------------------
async def create_sampling_session(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return web.json_response(await tk.create_sampling_session(owner, await _json(request)))


async def get_sampler(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return web.json_response(tk.sampling.info(owner, request.match_info["sampler_id"]))


async def asample(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return web.json_response(await tk.sampling.sample(owner, await _json(request)))


# -- futures ------------------------------------------------------------------------------
async def retrieve_future(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    request_id = (await _json(request)).str("request_id")
    try:
        try:
            result = await tk.futures.wait(request_id, owner, HOLD_S)
        except NotFoundError:  # from before a restart: the operation itself is durable
            result = await tk.recovered(owner, request_id, HOLD_S)
    except SignalError as exc:
        # Gone (pruned long ago): 410 makes a sampling client submit again.
        return web.json_response(error_result(exc), status=410)
    if result is None:
        return web.json_response({"type": "try_again", "request_id": request_id,
                                  **tk.queue_state(owner, request_id)})
    if isinstance(result, bytes):
        return web.Response(body=result, content_type=PROTOBUF)
    return web.json_response(result)


async def cancel_future(request: web.Request) -> web.Response:
    await request.app[AUTH].user(request)
    return web.json_response({})  # sampling requests run to the end


# -- runs and checkpoints (RestClient) ----------------------------------------------------
def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def _checkpoints(tk: TinkerFrontEnd, owner: str, model_id: str) -> list[dict]:
    m, run = tk.model(owner, model_id)
    names = await tk.checkpoint_names(run.run_id)
    out = []
    for saved, (_version, created) in names.items():
        prefix, _, name = saved.partition(".")
        segment = {"w": "weights", "s": "sampler_weights"}.get(prefix)
        if segment is None:
            continue
        out.append({"checkpoint_id": f"{segment}/{name}",
                    "checkpoint_type": "training" if prefix == "w" else "sampler",
                    "time": _iso(created), "tinker_path": f"tinker://{m.model_id}/{segment}/"
                                                          f"{name}", "public": False})
    return sorted(out, key=lambda c: c["time"], reverse=True)


async def _training_run(tk: TinkerFrontEnd, owner: str, model_id: str) -> dict:
    m, run = tk.model(owner, model_id)
    checkpoints = await _checkpoints(tk, owner, model_id)
    last = {t: next((c for c in checkpoints if c["checkpoint_type"] == t), None)
            for t in ("training", "sampler")}
    touched = run.history[-1]["time"] if run.history else run.spec.created_at
    return {"training_run_id": m.model_id, "base_model": run.spec.base_model,
            "model_owner": owner, "is_lora": True, "corrupted": False,
            "lora_rank": run.spec.lora.r, "last_request_time": _iso(touched),
            "last_checkpoint": last["training"], "last_sampler_checkpoint": last["sampler"]}


async def training_run(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return web.json_response(await _training_run(tk, owner, request.match_info["model_id"]))


async def training_runs(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    limit = min(max(int(request.query.get("limit", "20")), 1), 1000)
    offset = max(int(request.query.get("offset", "0")), 0)
    mine = [m for m in tk.models.values() if m.owner == owner and m.run_id in tk.coord.runs]
    page = [await _training_run(tk, owner, m.model_id) for m in mine[offset:offset + limit]]
    return web.json_response({"training_runs": page, "cursor": {
        "offset": offset, "limit": limit, "total_count": len(mine)}})


async def run_checkpoints(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    return web.json_response({"checkpoints": await _checkpoints(
        tk, owner, request.match_info["model_id"])})


async def all_checkpoints(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    found = []
    for m in list(tk.models.values()):
        if m.owner == owner and m.run_id in tk.coord.runs:
            found += await _checkpoints(tk, owner, m.model_id)
    found.sort(key=lambda c: c["time"], reverse=True)
    return web.json_response({"checkpoints": found[:1000]})


async def weights_info(request: web.Request) -> web.Response:
    owner, tk = await _ctx(request)
    source, run, _, _ = await tk.resolve(owner, (await _json(request)).str("tinker_path"))
    return web.json_response({"base_model": run.spec.base_model, "is_lora": True,
                              "lora_rank": run.spec.lora.r, **source.flags})


def add_routes(app: web.Application) -> None:
    coordinator = app[COORDINATOR]
    app[TINKER] = TinkerFrontEnd(coordinator)
    routes = [
        ("POST", "client/config", client_config), ("POST", "client/dynamic_config",
                                                   dynamic_config),
        ("GET", "get_server_capabilities", capabilities),
        ("POST", "create_session", create_session), ("POST", "session_heartbeat", heartbeat),
        ("POST", "telemetry", telemetry), ("POST", "sessions/{session_id}/finish",
                                           finish_session),
        ("GET", "sessions/{session_id}", get_session),
        ("POST", "create_model", create_model), ("POST", "get_info", get_info),
        ("POST", "forward_backward", forward_backward), ("POST", "optim_step", optim_step),
        ("POST", "save_weights", save_weights),
        ("POST", "save_weights_for_sampler", save_for_sampler),
        ("POST", "load_weights", load_weights),
        ("POST", "create_sampling_session", create_sampling_session),
        ("GET", "samplers/{sampler_id}", get_sampler), ("POST", "asample", asample),
        ("POST", "retrieve_future", retrieve_future), ("POST", "cancel_future", cancel_future),
        ("GET", "training_runs", training_runs),
        ("GET", "training_runs/{model_id}", training_run),
        ("GET", "training_runs/{model_id}/checkpoints", run_checkpoints),
        ("GET", "checkpoints", all_checkpoints), ("POST", "weights_info", weights_info),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, f"{PREFIX}/{path}", _errors(handler))

    async def start(app: web.Application) -> None:
        await app[TINKER].start()

    app.on_startup.append(start)
