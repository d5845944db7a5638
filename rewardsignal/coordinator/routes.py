"""HTTP handlers: parse and check the request, call the ``Coordinator``, answer
JSON. Worker endpoints speak msgpack for submissions (tensors inside)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rewardsignal import __version__
from rewardsignal.aggregation.optim import AdamWConfig
from rewardsignal.checkpoints.store import ADAPTER_FILE, check_name
from rewardsignal.coordinator import submissions
from rewardsignal.coordinator.fields import Body
from rewardsignal.errors import NotFoundError, ValidationError, http_status_for
from rewardsignal.lora import LoraSpec
from rewardsignal.protocol import MSGPACK, pack, unpack
from rewardsignal.worker.losses import LOSS_FNS, check_loss_fn

COORDINATOR = web.AppKey("coordinator", object)
AUTH = web.AppKey("auth", object)
METRICS = web.AppKey("metrics", object)

_MAX_BATCH = 65_536
_MAX_PROMPTS = 256
_MAX_WAIT_S = 120.0
_OPS = ("forward_backward", "forward", "optim_step", "sample", "save_state", "train_federated")


def decode_body(raw: bytes, content_type: str, max_bytes: int) -> object:
    if content_type == MSGPACK:
        return unpack(raw, max_bytes=max_bytes)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationError(f"body is not valid JSON: {exc}") from None


async def read_raw(request: web.Request) -> bytearray:
    """The request body, read without ``request.read()``'s cache.

    ``request.read()`` keeps the body on the request object, and aiohttp keeps a
    keep-alive connection's last request alive until the next request arrives on
    that connection. With 1,000 idle workers that pinned ~350 submitted 7 MB
    updates (2.4 GB, found with ``gc`` under ``bench/coordinator_load.py``). This
    buffer dies with the handler.
    """
    limit = request.app[COORDINATOR].config.max_body_bytes
    size = request.content_length
    if size is not None and size > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
    buf = bytearray(size or 0)
    view, filled = memoryview(buf), 0
    while chunk := await _next_chunk(request):
        end = filled + len(chunk)
        if end > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=end)
        if end <= len(buf):
            view[filled:end] = chunk
        else:  # no Content-Length (chunked): grow (aiohttp stops at a declared length)
            view.release()
            buf[filled:] = chunk
            view = memoryview(buf)
        filled = end
    view.release()
    if filled != len(buf):
        raise ValidationError(f"body ended after {filled} of {len(buf)} bytes")
    return buf


async def _next_chunk(request: web.Request) -> bytes:
    try:
        return await request.content.readany()
    except (ConnectionResetError, HttpProcessingError) as exc:
        # A sender that died mid-upload, or broken chunked framing: the sender's
        # problem, answered (if anyone is listening) rather than logged as ours.
        raise ValidationError(f"request body cut off or malformed: {exc}") from None


async def read_body(request: web.Request) -> object:
    return decode_body(await read_raw(request), request.content_type,
                       request.app[COORDINATOR].config.max_body_bytes)


def _query_float(request: web.Request, key: str, default: float, hi: float) -> float:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValidationError(f"query parameter {key} must be a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValidationError(f"query parameter {key} must be >= 0")
    return min(value, hi)


# -- open endpoints -----------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def metrics(request: web.Request) -> web.Response:
    request.app[COORDINATOR].tick()
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


_DASHBOARD = Path(__file__).parent / "static" / "dashboard.html"


async def dashboard(request: web.Request) -> web.Response:
    """The live dashboard: static HTML + JS (no CDN) that polls ``/v1/status``."""
    return web.Response(body=_DASHBOARD.read_bytes(), content_type="text/html")


# -- user endpoints ---------------------------------------------------------------------
async def status(request: web.Request) -> web.Response:
    owner = request.app[AUTH].user(request)
    request.app[COORDINATOR].tick()
    return web.json_response(request.app[COORDINATOR].status(owner))


async def list_models(request: web.Request) -> web.Response:
    from rewardsignal.models import list_models as builtin_models

    request.app[AUTH].user(request)
    return web.json_response({"models": builtin_models(),
                              "note": "any Hugging Face causal LM id is accepted too"})


async def list_workers(request: web.Request) -> web.Response:
    request.app[AUTH].user(request)
    workers = request.app[COORDINATOR].scheduler.workers.values()
    return web.json_response({"workers": [w.to_json() for w in workers]})


async def create_run(request: web.Request) -> web.Response:
    from rewardsignal.models import model_info, resolve_model_path

    owner = request.app[AUTH].user(request)
    b = Body(await read_body(request))
    base = b.str("base_model")
    await asyncio.to_thread(resolve_model_path, base)  # NotFoundError -> 404 with advice
    info = await asyncio.to_thread(model_info, base)
    r = b.int("lora_r", 8, lo=1, hi=1024)
    targets = b.list("lora_target_modules", None, max_len=64)
    lora = LoraSpec(r=r, alpha=b.float("lora_alpha", 2.0 * r, lo=0, lo_open=True),
                    dropout=b.float("lora_dropout", 0.0, lo=0, hi=0.99),
                    target_modules=tuple(targets) if targets is not None
                    else info.default_target_modules,
                    seed=b.int("seed", 0, lo=0, hi=2**63 - 1))
    optimizer = _adamw(b, AdamWConfig())
    max_length = b.int("max_length", 2048, lo=2, hi=1 << 20)
    b.done()
    run = await request.app[COORDINATOR].create_run(
        owner, {"base_model": base, "lora": lora, "optimizer": optimizer,
                "max_length": max_length})
    return web.json_response(run.to_json(), status=201)


def _adamw(b: Body, defaults: AdamWConfig) -> AdamWConfig:
    clip = b.float("grad_clip_norm", None, lo=0, lo_open=True)
    return AdamWConfig(
        learning_rate=b.float("learning_rate", defaults.learning_rate, lo=0, hi=10),
        beta1=b.float("beta1", defaults.beta1, lo=0, hi=0.999999),
        beta2=b.float("beta2", defaults.beta2, lo=0, hi=0.99999999),
        eps=b.float("eps", defaults.eps, lo=0, lo_open=True, hi=1.0),
        weight_decay=b.float("weight_decay", defaults.weight_decay, lo=0, hi=10),
        grad_clip_norm=clip if clip is not None else defaults.grad_clip_norm)


async def list_runs(request: web.Request) -> web.Response:
    owner = request.app[AUTH].user(request)
    runs = request.app[COORDINATOR].runs_of(owner)
    return web.json_response({"runs": [r.to_json() for r in runs]})


async def get_run(request: web.Request) -> web.Response:
    owner = request.app[AUTH].user(request)
    run = request.app[COORDINATOR].run_for(owner, request.match_info["run_id"])
    return web.json_response(run.to_json())


async def run_op(request: web.Request) -> web.Response:
    """POST /v1/runs/{run_id}/{op}: check the arguments now (a bad request changes
    nothing), queue the operation, answer 202 with a request id to wait on."""
    owner = request.app[AUTH].user(request)
    coord = request.app[COORDINATOR]
    op = request.match_info["op"]
    if op not in _OPS:
        raise NotFoundError(f"unknown operation {op!r}; expected one of {list(_OPS)}")
    run = coord.run_for(owner, request.match_info["run_id"])
    b = Body(await read_body(request))
    timeout_s = b.float("timeout_s", None, lo=0, lo_open=True, hi=7 * 86400)
    if op in ("forward_backward", "forward"):
        loss_fn = b.str("loss_fn", "cross_entropy", choices=LOSS_FNS)
        config = check_loss_fn(loss_fn, b.dict("loss_fn_config", {}))
        reduction = b.str("reduction", "mean", choices=("mean", "sum")) \
            if op == "forward_backward" else "mean"
        # Tokenising (chat templates) is CPU work: off the event loop.
        datums = await asyncio.to_thread(coord.to_datums, run, b.list("batch",
                                                                       max_len=_MAX_BATCH))
        if loss_fn != "cross_entropy":
            for i, d in enumerate(datums):
                missing = [k for k in ("logprobs", "advantages") if k not in d.extra]
                if missing:
                    raise ValidationError(f"batch[{i}]: loss_fn {loss_fn} needs "
                                          f"loss_fn_inputs.{missing[0]}")
        args = {"datums": datums, "loss_fn": loss_fn, "loss_fn_config": config,
                "reduction": reduction}
    elif op == "optim_step":
        args = {"optimizer": _adamw(b, run.spec.optimizer)}
    elif op == "sample":
        args = _sample_args(b, coord, run)
    elif op == "train_federated":
        job = await _federated_job(b, coord, run, owner)
        b.done()
        coord.jobs[job.job_id] = job
        await coord.save_job(job)
        req = await coord.enqueue(owner, run, op, {"job_id": job.job_id}, None)
        return web.json_response({**req.to_json(), "job_id": job.job_id}, status=202)
    else:
        mode = b.str("mode", "adapter", choices=("adapter", "merged"))
        name = b.str("name", None, max_len=64)
        if name is not None:
            check_name(name)
        args = {"mode": mode, "name": name}
    b.done()
    req = await coord.enqueue(owner, run, op, args, timeout_s)
    return web.json_response(req.to_json(), status=202)


async def _examples(b: Body, coord, owner: str, id_key: str, list_key: str, required: bool):
    dataset_id = b.str(id_key, None, max_len=64)
    examples = b.list(list_key, None, max_len=_MAX_BATCH * 16)
    if dataset_id is not None and examples is not None:
        raise ValidationError(f"give {id_key!r} or {list_key!r}, not both")
    if dataset_id is not None:
        _, examples = await asyncio.to_thread(coord.datasets.load, owner, dataset_id)
    if examples is None:
        if required:
            raise ValidationError(f"missing field {id_key!r} (upload with POST /v1/datasets) "
                                  f"or {list_key!r}")
        return None
    return examples


async def _federated_job(b: Body, coord, run, owner: str):
    from rewardsignal.aggregation.codecs import CODECS
    from rewardsignal.aggregation.combine import AGGREGATORS
    from rewardsignal.aggregation.outer import DEFAULT_OUTER_LR, OUTER_OPTIMIZERS, OuterConfig
    from rewardsignal.coordinator.federated import FederatedConfig, FederatedJob

    cfg = coord.config
    train = await _examples(b, coord, owner, "dataset_id", "examples", True)
    held_out = await _examples(b, coord, owner, "eval_dataset_id", "eval_examples", False)
    outer_name = b.str("outer_optimizer", "fedavg", choices=OUTER_OPTIMIZERS)
    tasks_per_round = b.int("tasks_per_round", cfg.num_tasks_per_round, lo=1, hi=4096)
    fed = FederatedConfig(
        rounds=b.int("rounds", lo=1, hi=1_000_000),
        local_steps=b.int("local_steps", 8, lo=1, hi=100_000),
        batch_size=b.int("batch_size", 8, lo=1, hi=65_536),
        inner_learning_rate=b.float("inner_learning_rate", run.spec.optimizer.learning_rate,
                                    lo=0, lo_open=True, hi=10),
        outer=OuterConfig(outer_name,
                          b.float("outer_learning_rate", DEFAULT_OUTER_LR[outer_name], lo=0,
                                  lo_open=True, hi=10),
                          momentum=b.float("outer_momentum", 0.9, lo=0, hi=0.999)),
        aggregator=b.str("aggregator", "mean", choices=AGGREGATORS),
        trim_fraction=b.float("trim_fraction", 0.2, lo=0, hi=0.49),
        clip_norm=b.float("clip_norm", None, lo=0, lo_open=True),
        tasks_per_round=tasks_per_round,
        min_updates_per_round=b.int("min_updates_per_round",
                                    min(cfg.min_updates_per_round, tasks_per_round), lo=1,
                                    hi=tasks_per_round),
        round_timeout_s=b.float("round_timeout_s", cfg.round_timeout_s, lo=0, lo_open=True,
                                hi=7 * 86400),
        max_staleness=b.int("max_staleness", 0, lo=0, hi=1000),
        delta_norm_max=b.float("delta_norm_max", None, lo=0, lo_open=True),
        codec=b.str("codec", "fp32", choices=CODECS),
        seed=b.int("seed", 0, lo=0, hi=2**63 - 1))
    train_datums = await asyncio.to_thread(coord.to_datums, run, train, "dataset")
    eval_datums = (await asyncio.to_thread(coord.to_datums, run, held_out, "eval_dataset")
                   if held_out is not None else [])
    return FederatedJob(FederatedJob.new_id(), run.run_id, owner, fed, train_datums, eval_datums)


async def upload_dataset(request: web.Request) -> web.Response:
    owner = request.app[AUTH].user(request)
    raw = await read_raw(request)
    name = request.query.get("name", "dataset.jsonl")[:128]
    meta = await asyncio.to_thread(request.app[COORDINATOR].datasets.save, owner, raw, name)
    return web.json_response(meta, status=201)


def _job(request: web.Request):
    owner = request.app[AUTH].user(request)
    job = request.app[COORDINATOR].jobs.get(request.match_info["job_id"])
    if job is None or job.owner != owner:
        raise NotFoundError(f"unknown job {request.match_info['job_id']}")
    return job


async def get_job(request: web.Request) -> web.Response:
    """Long-poll: answers at once, or (with ``timeout_s``) when the job changes."""
    job = _job(request)
    timeout_s = _query_float(request, "timeout_s", 0.0, _MAX_WAIT_S)
    seen = request.query.get("after")
    if timeout_s > 0 and seen == _job_stamp(job) and not job.to_json()["finished"]:
        try:
            await asyncio.wait_for(job.changed.wait(), timeout_s)
        except TimeoutError:
            pass
    return web.json_response({**job.to_json(), "stamp": _job_stamp(job)})


def _job_stamp(job) -> str:
    return f"{job.status}:{job.round}:{job.accepted}:{sum(job.rejected.values())}"


async def cancel_job(request: web.Request) -> web.Response:
    job = _job(request)
    job.cancel_requested = True
    job._touch()
    return web.json_response({**job.to_json(), "stamp": _job_stamp(job)})


def _sample_args(b: Body, coord, run) -> dict:
    from rewardsignal.models import model_info

    prompts = b.list("prompts", None, max_len=_MAX_PROMPTS)
    prompt_tokens = b.list("prompt_tokens", None, max_len=_MAX_PROMPTS)
    if (prompts is None) == (prompt_tokens is None):
        raise ValidationError("give exactly one of 'prompts' (strings) or 'prompt_tokens'")
    tok = coord.tokenizer(run.spec.base_model)
    if prompts is not None:
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValidationError("field 'prompts' must be a non-empty list of strings")
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        prompt_tokens = [bos + tok.encode(p, add_special_tokens=False) for p in prompts]
    else:
        vocab = len(tok)
        if not prompt_tokens or not all(
                isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                                  and 0 <= t < vocab for t in p)
                for p in prompt_tokens):
            raise ValidationError(f"field 'prompt_tokens' must be a non-empty list of non-empty "
                                  f"lists of token ids in [0, {vocab})")
    limit = 1 << 20
    info = model_info(run.spec.base_model)
    if info.builtin:
        from rewardsignal.models import BUILTIN_MODELS

        limit = BUILTIN_MODELS[run.spec.base_model].max_position_embeddings
    max_tokens = b.int("max_tokens", 64, lo=1, hi=4096)
    longest = max(map(len, prompt_tokens))
    if longest + max_tokens > limit:
        raise ValidationError(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the "
                              f"model's context of {limit} tokens")
    return {"prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
            "temperature": b.float("temperature", 1.0, lo=0, hi=100),
            "top_p": b.float("top_p", 1.0, lo=0, lo_open=True, hi=1.0),
            "seed": b.int("seed", None, lo=0, hi=2**63 - 1)}


async def wait_request(request: web.Request) -> web.Response:
    owner = request.app[AUTH].user(request)
    timeout_s = _query_float(request, "timeout_s", 30.0, _MAX_WAIT_S)
    coord = request.app[COORDINATOR]
    request_id = request.match_info["request_id"]
    try:
        req = await coord.requests.wait(request_id, owner, timeout_s)
        body = req.to_json()
    except NotFoundError:
        # Finished before the coordinator last restarted: the database has it.
        old = await coord.db.finished_request(request_id)
        if old is None or old["owner"] != owner:
            raise
        body = {"request_id": request_id, "run_id": old["run_id"], "kind": old["kind"],
                "status": old["status"],
                **({"result": old["result"]} if old["status"] == "done" else old["result"])}
    if body["status"] == "failed":
        return web.json_response(body, status=http_status_for(body["error"]["code"]))
    return web.json_response(body, status=200 if body["status"] == "done" else 202)


async def get_artifact(request: web.Request) -> web.Response:
    owner = request.app[AUTH].user(request)
    coord = request.app[COORDINATOR]
    run = coord.run_for(owner, request.match_info["run_id"])
    meta, _ = coord.artifact(run, request.match_info["name"])
    return web.json_response(meta)


async def get_artifact_file(request: web.Request) -> web.StreamResponse:
    owner = request.app[AUTH].user(request)
    coord = request.app[COORDINATOR]
    run = coord.run_for(owner, request.match_info["run_id"])
    meta, directory = coord.artifact(run, request.match_info["name"])
    filename = request.match_info["filename"]
    if filename not in {f["path"] for f in meta["files"]}:
        raise NotFoundError(f"saved state {meta['name']!r} has no file {filename!r}")
    path = directory / filename
    request.app[METRICS].bytes_out.labels("artifact").inc(path.stat().st_size)
    return web.FileResponse(path)


# -- weights: users (their own runs) and workers (runs they hold a lease on) ---------------
async def get_weights(request: web.Request) -> web.StreamResponse:
    coord = request.app[COORDINATOR]
    run_id = request.match_info["run_id"]
    try:
        version = int(request.match_info["version"])
    except ValueError:
        raise ValidationError("version must be an integer") from None
    worker_id = request.headers.get("X-Signal-Worker")
    if worker_id:
        request.app[AUTH].worker(request)
        w = coord.scheduler.worker(worker_id)
        holds = any(t.run_id == run_id and any(le.worker_id == w.worker_id
                                               for le in t.leases.values())
                    for t in coord.scheduler.tasks.values())
        if not holds or run_id not in coord.runs:
            raise NotFoundError(f"unknown run {run_id} (no lease of this worker needs it)")
    else:
        coord.run_for(request.app[AUTH].user(request), run_id)
    etag = '"' + coord.store.adapter_sha256(run_id, version) + '"'
    headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
    # A content-hash ETag (not aiohttp's mtime-based one) so caches agree across
    # coordinator restarts, restores from backup and replicas.
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    file = coord.store.path(run_id, version) / ADAPTER_FILE
    # Streamed, not web.Response(body=...): aiohttp keeps a connection's last
    # response alive while the connection idles, and a Response would pin its body.
    resp = web.StreamResponse(headers=headers)
    resp.content_type = "application/vnd.safetensors"
    if request.method == "HEAD":
        resp.content_length = file.stat().st_size
        await resp.prepare(request)
        return resp
    body = await asyncio.to_thread(file.read_bytes)
    request.app[METRICS].bytes_out.labels("weights").inc(len(body))
    resp.content_length = len(body)
    await resp.prepare(request)
    await resp.write(body)
    await resp.write_eof()
    return resp


# -- worker endpoints --------------------------------------------------------------------------
async def register_worker(request: web.Request) -> web.Response:
    request.app[AUTH].worker(request)
    b = Body(await read_body(request))
    name = b.str("name", max_len=128)
    device = b.str("device", max_len=64)
    hardware = b.dict("hardware", {})
    if len(json.dumps(hardware)) > 16_384:
        raise ValidationError("field 'hardware' is too large")
    max_tokens = b.int("max_tokens_per_task", 8192, lo=16, hi=1 << 24)
    models = b.list("models", None, max_len=256)
    if models is not None and not all(isinstance(m, str) for m in models):
        raise ValidationError("field 'models' must be a list of model ids")
    b.str("protocol", "1")
    b.done()
    coord = request.app[COORDINATOR]
    w = coord.scheduler.register(
        name=name, device=device, hardware=hardware, max_tokens_per_task=max_tokens,
        models=tuple(models) if models is not None else None)
    await coord.db.save_worker(w.worker_id, name, {
        "name": name, "device": device, "hardware": hardware,
        "max_tokens_per_task": max_tokens, "models": models})
    return web.json_response({"worker_id": w.worker_id}, status=201)


async def lease_task(request: web.Request) -> web.Response:
    started = time.monotonic()
    request.app[AUTH].worker(request)
    coord = request.app[COORDINATOR]
    w = coord.scheduler.worker(request.match_info["worker_id"])
    if w.quarantined:
        return web.json_response({"error": {"code": "quarantined",
                                            "message": w.quarantine_reason}}, status=403)
    timeout_s = _query_float(request, "timeout_s", 20.0, _MAX_WAIT_S)
    got = await coord.scheduler.lease(w, timeout_s)
    if got is None:
        return web.Response(status=204)
    task, lease = got
    resp = web.json_response(submissions.task_message(coord, task, lease.lease_id))
    # How long handing out work takes: split by whether the lease found nothing it
    # could take on arrival and parked (then the time is mostly waiting for work).
    coord.metrics.lease_seconds.labels("yes" if lease.parked else "no"
                                       ).observe(time.monotonic() - started)
    return resp


async def heartbeat(request: web.Request) -> web.Response:
    request.app[AUTH].worker(request)
    coord = request.app[COORDINATOR]
    w = coord.scheduler.worker(request.match_info["worker_id"])
    return web.json_response({"leases_extended": coord.scheduler.heartbeat(w)})


async def upload_slot(request: web.Request) -> web.Response:
    """Long-poll for a slot to upload a submission into (see ``slots``)."""
    request.app[AUTH].worker(request)
    coord = request.app[COORDINATOR]
    coord.scheduler.note_uploading(coord.scheduler.worker(request.match_info["worker_id"]))
    slot = await coord.upload_slots.reserve(_query_float(request, "timeout_s", 20.0,
                                                         _MAX_WAIT_S))
    if slot is None:
        return web.Response(status=204)
    return web.json_response({"slot": slot, "hold_s": coord.upload_slots.hold_s})


async def submit_result(request: web.Request) -> web.Response:
    coord = request.app[COORDINATOR]
    if not coord.upload_slots.take(request.query.get("slot")):
        await coord.upload_slots.acquire()  # no reserved slot: wait for one here
    try:
        request.app[AUTH].worker(request)
        raw = await read_raw(request)
        # A multi-MB map: parse it off the event loop.
        msg = await asyncio.to_thread(decode_body, raw, request.content_type,
                                      coord.config.max_body_bytes)
        del raw  # the decoded map holds its own copy of the tensors
        if not isinstance(msg, dict):
            raise ValidationError("submission must be a msgpack map")
        w = coord.scheduler.worker(str(msg.get("worker_id")))
        out = await submissions.submit(coord, w, request.match_info["task_id"], msg)
    finally:
        coord.upload_slots.release()
    if request.content_type == MSGPACK:
        return web.Response(body=pack(out), content_type=MSGPACK)
    return web.json_response(out)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", dashboard)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/workers", list_workers)
    app.router.add_post("/v1/runs", create_run)
    app.router.add_get("/v1/runs", list_runs)
    app.router.add_get("/v1/runs/{run_id}", get_run)
    app.router.add_post("/v1/runs/{run_id}/{op}", run_op)
    app.router.add_get("/v1/runs/{run_id}/weights/{version}", get_weights)
    app.router.add_get("/v1/runs/{run_id}/artifacts/{name}", get_artifact)
    app.router.add_get("/v1/runs/{run_id}/artifacts/{name}/files/{filename}", get_artifact_file)
    app.router.add_get("/v1/requests/{request_id}", wait_request)
    app.router.add_post("/v1/datasets", upload_dataset)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    app.router.add_post("/v1/jobs/{job_id}/cancel", cancel_job)
    app.router.add_post("/v1/workers/register", register_worker)
    app.router.add_post("/v1/workers/{worker_id}/lease", lease_task)
    app.router.add_post("/v1/workers/{worker_id}/heartbeat", heartbeat)
    app.router.add_post("/v1/workers/{worker_id}/upload-slot", upload_slot)
    app.router.add_post("/v1/tasks/{task_id}/result", submit_result)
