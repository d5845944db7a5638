"""Worker endpoints: register, lease (long-poll), heartbeat, upload slot,
submit. Submissions are msgpack maps with safetensors bytes inside."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from rewardsignal import tracing
from rewardsignal.checkpoints.export import MERGED_WEIGHT_SUFFIXES
from rewardsignal.coordinator.api.appkeys import AUTH, COORDINATOR, METRICS
from rewardsignal.coordinator.api.bodies import (
    MAX_WAIT_S,
    decode_body,
    query_float,
    read_body,
    read_raw,
)
from rewardsignal.coordinator.coordinator import Coordinator
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ingest.accept import off_loop
from rewardsignal.coordinator.scheduling.tasks import Task, Uploads
from rewardsignal.coordinator.scheduling.workers import WorkerInfo
from rewardsignal.errors import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    PayloadTooLargeError,
    ValidationError,
)
from rewardsignal.precision import BASE_DTYPES, QUANTIZATIONS, TORCH_NAMES
from rewardsignal.protocol import (
    CHECK_FEATURES,
    FRAMES,
    MSGPACK,
    OPTIONAL_TASKS,
    RESULT,
    XOR_DELTA,
    TaskMessage,
    frame,
    pack,
    unpack_result,
)

log = logging.getLogger("signal.coordinator")

# Versions pushed to a worker through streamed leases since its last task of a
# run: it stays current across the few steps it sits out, and one that stopped
# getting the run's tasks stops getting its deltas.
PUSH_CREDIT = 4


async def register_worker(request: web.Request) -> web.Response:
    token_id = await request.app[AUTH].worker(request)
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
    caps = _read_capabilities(b)
    b.str("protocol", "1")
    b.done()
    w = await request.app[COORDINATOR].register_worker(
        name=name, device=device, hardware=hardware, max_tokens_per_task=max_tokens,
        models=tuple(models) if models is not None else None, capabilities=caps,
        token_id=token_id)
    # The result bodies it reads besides msgpack: a worker sends tensors after
    # the map (``RESULT``) only to a coordinator that names it.
    # ``lease_with_result``: a result may carry the next lease (``submit_result``);
    # ``channel``: where the worker may lease and send those results instead
    # (``api.channel``).
    return web.json_response({"worker_id": w.worker_id, "result_types": [MSGPACK, RESULT],
                              "lease_with_result": True,
                              "channel": f"/v1/workers/{w.worker_id}/channel"}, status=201)


def _read_capabilities(b: Body) -> dict:
    """What a worker says it can load and hold: ``precisions`` {"auto": dtype it
    loads for "auto", "base_dtypes": [...], "quantization": [...], "note": why it
    cannot quantize} and ``memory_bytes``. Absent: a worker from before run
    precision, which serves only default-precision runs and has no memory bound."""
    caps: dict = {"memory_bytes": b.int("memory_bytes", None, lo=1, hi=1 << 50),
                  "host_memory_bytes": b.int("host_memory_bytes", None, lo=1, hi=1 << 50)}
    checks = b.list("checks", [], max_len=16)
    if not all(isinstance(c, str) and len(c) <= 64 for c in checks):
        raise ValidationError("field 'checks' must be a list of names")
    # Names this coordinator does not know (a newer worker's) are left out.
    caps["checks"] = sorted(set(checks) & set(CHECK_FEATURES))
    tasks = b.list("tasks", [], max_len=16)
    if not all(isinstance(t, str) and len(t) <= 64 for t in tasks):
        raise ValidationError("field 'tasks' must be a list of task kinds")
    caps["tasks"] = sorted(set(tasks) & set(OPTIONAL_TASKS))
    p = b.dict("precisions", None)
    if p is None:
        return caps
    pb = Body(p, "precisions")
    dtypes = pb.list("base_dtypes", [], max_len=8)
    quant = pb.list("quantization", [], max_len=8)
    if not set(dtypes) <= set(BASE_DTYPES):
        raise ValidationError(f"precisions.base_dtypes must be among {list(BASE_DTYPES)}")
    if not set(quant) <= set(QUANTIZATIONS):
        raise ValidationError(f"precisions.quantization must be among {list(QUANTIZATIONS)}")
    caps.update(base_dtypes=sorted(set(dtypes) | {"auto"}), quantization=sorted(set(quant)),
                auto_dtype=pb.str("auto", "", choices=tuple(TORCH_NAMES)),
                quantization_note=pb.str("note", "", max_len=512))
    pb.done()
    return caps


async def _task_message(coord: Coordinator, task: Task, lease_id: str) -> TaskMessage:
    run = coord.runs[task.run_id]
    return TaskMessage(
        task_id=task.task_id, lease_id=lease_id, kind=task.kind, run_id=run.run_id,
        base_model=run.spec.base_model, fingerprint=run.spec.fingerprint,
        version=task.version, lora=run.spec.lora.to_json(),
        weights_url=f"/v1/runs/{run.run_id}/weights/{task.version}",
        weights_sha256=await coord.services.versions.adapter_sha256(run.run_id, task.version),
        lease_timeout_s=coord.config.lease_timeout_s, payload=task.payload,
        base_dtype=run.spec.precision.base_dtype, quantization=run.spec.precision.quantization)


async def lease_task(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    await request.app[AUTH].worker(request)
    coord = request.app[COORDINATOR]
    w = coord.scheduler.worker(request.match_info["worker_id"])
    if w.quarantined:
        return web.json_response({"error": {"code": "quarantined",
                                            "message": w.quarantine_reason}}, status=403)
    timeout_s = query_float(request, "timeout_s", 20.0, MAX_WAIT_S)
    have = await _versions_held(request)
    if XOR_DELTA not in request.query.get("deltas", "").split(","):
        # A worker from before this delta codec (it names the codecs it applies):
        # it downloads each version rather than be sent a delta it cannot use.
        have = {}
    accept = request.headers.get("Accept", "")
    if request.query.get("push") == "1" and FRAMES in accept:
        return await _lease_stream(request, coord, w, timeout_s, have, started)
    got = await coord.scheduler.lease(w, timeout_s)
    if got is None:
        return web.Response(status=204)
    task, lease = got
    if MSGPACK in accept:
        # A worker that reads msgpack gets the task's version as the exact delta
        # from the one it holds, when it is one behind: no download round trip.
        msg = await _lease_message(coord, w, task, lease.lease_id, have.get(task.run_id))
        resp = web.Response(body=pack(msg), content_type=MSGPACK)
    else:
        resp = web.json_response(await _lease_message(coord, w, task, lease.lease_id, None))
    _observe_lease(coord, lease.parked, started)
    return resp


def _observe_lease(coord: Coordinator, parked: bool, started: float) -> None:
    # How long handing out work takes: split by whether the lease found nothing it
    # could take on arrival and parked (then the time is mostly waiting for work).
    coord.metrics.lease_seconds.labels("yes" if parked else "no"
                                       ).observe(time.monotonic() - started)


async def _lease_message(coord: Coordinator, w: WorkerInfo, task: Task, lease_id: str,
                         held: int | None) -> dict:
    """The task message, with the exact delta to its version when the worker
    holds the version before (``held``)."""
    w.push_credit[task.run_id] = PUSH_CREDIT
    msg = (await _task_message(coord, task, lease_id)).to_json()
    delta = (await coord.services.versions.recent.delta(task.run_id, held, task.version)
             if held is not None else None)
    if held is not None and delta is not None:
        msg["weights_delta"] = _weights_delta(coord, "weights_inline", held, delta)
    return msg


def _weights_delta(coord: Coordinator, kind: str, from_version: int, delta: bytes) -> dict:
    """A message's ``weights_delta`` (in a task or a pushed ``version`` frame),
    its bytes counted under ``kind``."""
    coord.metrics.bytes_out.labels(kind).inc(len(delta))
    return {"from_version": from_version, "codec": XOR_DELTA, "data": delta}


class Frames(Protocol):
    """Where a streamed lease's frames go: an HTTP response's body, or the
    worker's channel (``api.channel``). ``end``: the lease is over, with its
    task sent or not. Both raise ``ConnectionError`` once the worker is gone."""
    async def write(self, data: bytes) -> None: ...
    async def end(self, task_sent: bool) -> None: ...


class _HttpFrames:
    def __init__(self, resp: web.StreamResponse) -> None:
        self._resp = resp

    async def write(self, data: bytes) -> None:
        await self._resp.write(data)

    async def end(self, task_sent: bool) -> None:
        await self._resp.write_eof()


async def _lease_stream(request: web.Request, coord: Coordinator, w: WorkerInfo,
                        timeout_s: float, have: dict[str, int], started: float, *,
                        answer: dict | None = None) -> web.StreamResponse:
    """``?push=1`` with ``Accept: FRAMES``: the lease as a stream of frames
    (``stream_lease``) in the response's body."""
    resp = web.StreamResponse(headers={"Content-Type": FRAMES})
    await resp.prepare(request)
    await stream_lease(_HttpFrames(resp), coord, w, timeout_s, have, started, answer=answer)
    return resp


async def stream_lease(out: Frames, coord: Coordinator, w: WorkerInfo, timeout_s: float,
                       have: dict[str, int], started: float, *,
                       answer: dict | None = None, gone: asyncio.Future | None = None
                       ) -> tuple[Task, str] | None:
    """The lease as frames. While it is parked, each version of a run the worker
    holds that is committed meanwhile goes to it as the exact delta from the
    one before (a ``version`` frame), so the weights of the next step are in
    place before its task comes; the task is the last frame (none: the lease
    ends at the timeout). A lease sent with a result first answers it (an
    ``answer`` frame). ``gone``: done when the worker is known to have left (a
    parked lease then ends at once). Returns the task sent, with its lease id."""
    if answer is not None:
        try:
            await out.write(frame({"answer": answer}))
        except ConnectionError:  # gone: it sends the result again (a no-op: duplicate)
            return None
        tracing.mark("coordinator: result answered")
    held = dict(have)
    recent = coord.services.versions.recent
    leasing = asyncio.ensure_future(coord.scheduler.lease(w, timeout_s))
    sent = False
    try:
        while True:
            changed = recent.changed()  # before looking: no commit goes unseen
            for run_id in list(held):
                while (update := await _next_version(coord, w, run_id, held[run_id])):
                    await out.write(frame({"version": update}))
                    tracing.mark("coordinator: version frame written")
                    held[run_id] = update["version"]
            if leasing.done():
                break
            if gone is not None and gone.done():
                return None  # the task it may have been granted goes back (below)
            either: set[asyncio.Future[Any]] = {leasing, changed}
            if gone is not None:
                either.add(gone)
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        got = leasing.result()
        if got is not None:
            task, lease = got
            msg = await _lease_message(coord, w, task, lease.lease_id, held.get(task.run_id))
            await out.write(frame({"task": msg}))
            tracing.mark("coordinator: task frame written")
            sent = True
            _observe_lease(coord, lease.parked, started)
        await out.end(sent)
        return (task, lease.lease_id) if got is not None else None
    except ConnectionError:  # the worker went away; it leases again when it is back
        pass
    except Exception:  # the answer has begun: end it (the worker leases again) and say why
        log.exception("streamed lease failed worker=%s", w.name)
        try:
            await out.end(sent)
        except ConnectionError:
            pass
    finally:
        leasing.cancel()
        granted = (leasing.result() if leasing.done() and not leasing.cancelled()
                   and leasing.exception() is None else None)
        if granted is not None and not sent:  # handed out, never delivered: back in line
            coord.scheduler.release(granted[0], granted[1].lease_id,
                                    f"worker {w.name} left before its task reached it")
    return None


async def _next_version(coord: Coordinator, w: WorkerInfo, run_id: str, version: int
                        ) -> dict | None:
    """The ``version`` frame taking a worker from ``version`` of ``run_id`` to the
    next, while it has push credit for the run and the exact delta is kept."""
    run = coord.runs.get(run_id)
    if run is None or run.version <= version or w.push_credit.get(run_id, 0) <= 0:
        return None
    versions = coord.services.versions
    delta = await versions.recent.delta(run_id, version, version + 1)
    if delta is None:
        return None
    try:
        sha = await versions.adapter_sha256(run_id, version + 1)
    except NotFoundError:  # no longer served: the task brings the weights instead
        return None
    w.push_credit[run_id] -= 1
    return {"run_id": run_id, "version": version + 1, "weights_sha256": sha,
            "weights_delta": _weights_delta(coord, "weights_pushed", version, delta)}


async def _versions_held(request: web.Request) -> dict[str, int]:
    """The optional lease body ``{"have": {run_id: version}}``: the newest version
    of each run the worker holds (workers from before it send no body)."""
    if not request.body_exists:
        return {}
    b = Body(await read_body(request))
    have = _have(b)
    b.done()
    return have


def _have(b: Body) -> dict[str, int]:
    have = b.dict("have", {})
    if len(have) > 256 or not all(isinstance(k, str) and type(v) is int and v >= 0
                                  for k, v in have.items()):
        raise ValidationError("field 'have' must map at most 256 run ids to versions")
    return have


def lease_fields(fields: object) -> tuple[dict[str, int], float]:
    """A lease as one map, ``{"have", "timeout_s", "deltas"}`` (a result's
    ``lease`` field; the lease's body and query say the same): the versions
    held, as the lease would use them, and how long to wait for a task."""
    try:
        b = Body(fields, "field 'lease'")
        have = _have(b)
        timeout_s = b.float("timeout_s", 20.0, lo=0, hi=MAX_WAIT_S)
        deltas = b.list("deltas", [], max_len=16)
        b.done()
    except ValidationError as exc:
        raise ValidationError(f"lease: {exc.message}") from None
    # Deltas only for a worker that applies this codec (as the lease's ``deltas``).
    return (have if XOR_DELTA in deltas else {}), timeout_s


async def heartbeat(request: web.Request) -> web.Response:
    await request.app[AUTH].worker(request)
    coord = request.app[COORDINATOR]
    w = coord.scheduler.worker(request.match_info["worker_id"])
    return web.json_response({"leases_extended": coord.scheduler.heartbeat(w)})


async def goodbye(request: web.Request) -> web.Response:
    """A worker stopping cleanly: gone at once, its tasks back in the queue."""
    await request.app[AUTH].worker(request)
    coord = request.app[COORDINATOR]
    w = coord.scheduler.worker(request.match_info["worker_id"])
    return web.json_response({"released": coord.scheduler.goodbye(w)})


async def upload_slot(request: web.Request) -> web.Response:
    """Long-poll for a slot to upload a submission into (see ``scheduling.slots``)."""
    await request.app[AUTH].worker(request)
    coord = request.app[COORDINATOR]
    w = coord.scheduler.worker(request.match_info["worker_id"])
    coord.scheduler.note_uploading(w)
    slots = coord.services.upload_slots
    slot = await slots.reserve(query_float(request, "timeout_s", 20.0, MAX_WAIT_S),
                               coord.scheduler.upload_rank(w))
    if slot is None:
        return web.Response(status=204)
    return web.json_response({"slot": slot, "hold_s": slots.hold_s})


async def submit_result(request: web.Request) -> web.StreamResponse:
    """A task's result. With a ``lease`` field and ``FRAMES`` in ``Accept``, the
    answer is the worker's next lease as a stream whose first frame is the
    result's answer (``{"answer": {...}}``): one request a step, not two."""
    coord = request.app[COORDINATOR]
    # No reserved slot: one is waited for here, before the body is read.
    async with coord.services.upload_slots.holding(request.query.get("slot")):
        await request.app[AUTH].worker(request)
        # The body is handed over (no name keeps it here: take_result frees it).
        w, out, then_lease = await take_result(
            coord, request.match_info["task_id"], request.content_type, await read_raw(request),
            frames=FRAMES in request.headers.get("Accept", ""))
    if then_lease is not None and not w.quarantined:  # else its plain lease hears why
        have, timeout_s = then_lease
        # Its lease times from here (lease_seconds); the route's own duration
        # (the request metrics) then includes the lease's wait.
        return await _lease_stream(request, coord, w, timeout_s, have, time.monotonic(),
                                   answer=out)
    if request.content_type in (MSGPACK, RESULT):
        return web.Response(body=pack(out), content_type=MSGPACK)
    return web.json_response(out)


async def take_result(coord: Coordinator, task_id: str, content_type: str, raw: bytearray, *,
                      frames: bool, worker_id: str | None = None
                      ) -> tuple[WorkerInfo, dict, tuple[dict[str, int], float] | None]:
    """A result's body (``raw``, handed over) checked and taken: its worker, its
    answer, and the lease it carries (``lease_fields``; None: none). ``frames``:
    whether the answer can be a stream of frames, which a lease needs;
    ``worker_id``: the only worker the result may name (a worker's channel)."""
    if content_type == RESULT:  # the tensors stay where they are, in raw
        head = int.from_bytes(raw[:4], "big")  # a big map is parsed off the loop
        msg = await off_loop(head, unpack_result, raw, max_bytes=coord.config.max_body_bytes)
    else:  # a multi-MB map is parsed off the event loop
        msg = await off_loop(len(raw), decode_body, raw, content_type,
                             coord.config.max_body_bytes)
    del raw  # the map holds its tensors (a view of the body, or a copy)
    if not isinstance(msg, dict):
        raise ValidationError("submission must be a msgpack map")
    # Checked before the result counts: a bad lease changes nothing.
    then_lease = None
    if "lease" in msg:
        if not frames:
            raise ValidationError(f"a result with a lease is answered as a stream of frames: "
                                  f"send it with Accept: {FRAMES}")
        then_lease = lease_fields(msg.pop("lease"))
    if worker_id is not None and msg.get("worker_id") != worker_id:
        raise ForbiddenError(f"a result on {worker_id}'s channel names worker "
                             f"{str(msg.get('worker_id'))[:64]!r}")
    w = coord.scheduler.worker(str(msg.get("worker_id")))
    return w, await coord.ingest.submit(w, task_id, msg), then_lease


# A file of a merged export: its weights, by a plain name (the coordinator
# writes the config and tokenizer from the base's own files).
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_FILES = 256
_MAX_JSON_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 4 << 20


async def upload_file(request: web.Request) -> web.Response:
    """PUT /v1/tasks/{task_id}/files/{name}?lease_id=L: one file of a merged
    export. Its size (``Content-Length``) is reserved from the lease's budget
    first, so uploads in parallel cannot pass it together; the body streams to
    a temporary file, hashed on the way, and takes its name only when its
    sha256 is the one the worker named (``X-Signal-Sha256``) and the lease is
    still live. The worker's result then lists exactly the files it uploaded
    (``ingest.checks``)."""
    await request.app[AUTH].worker(request)
    coord = request.app[COORDINATOR]
    name = request.match_info["name"]
    if not _FILE_NAME.fullmatch(name) or not name.endswith(MERGED_WEIGHT_SUFFIXES):
        raise ValidationError(f"file name {name[:64]!r} is not a merged model's weights (a "
                              f"plain name ending in {' or '.join(MERGED_WEIGHT_SUFFIXES)})")
    sha = request.headers.get("X-Signal-Sha256", "")
    if not _SHA256.fullmatch(sha):
        raise ValidationError("header X-Signal-Sha256 must be the file's sha256 (64 hex digits)")
    size = request.content_length
    if size is None:
        raise ValidationError("send the file with a Content-Length")
    lease_id = request.query.get("lease_id", "")
    worker_id = request.headers.get("X-Signal-Worker", "")
    task = coord.scheduler.check_lease(request.match_info["task_id"], lease_id, worker_id)
    if task.kind != "export_merged":
        raise ValidationError(f"task {task.task_id} is a {task.kind} task: only a merged "
                              "export's task takes files")
    ups = task.uploads.setdefault(lease_id, Uploads())
    if name in ups.done or name in ups.receiving:
        raise ConflictError(f"{name} was already uploaded (or is being) on this lease")
    if len(ups.done) + len(ups.receiving) >= _MAX_FILES:
        raise ValidationError(f"an export has at most {_MAX_FILES} files")
    left = int(task.payload["max_bytes"]) - ups.used()
    if size > left:
        raise PayloadTooLargeError(f"{name}: {size} bytes, but only {left} of this lease's "
                                   "export budget are left")
    ups.receiving[name] = size  # reserved before the first await
    folder = coord.services.artifacts.upload_dir(task.run_id, task.task_id, lease_id)
    try:
        part, digest = await _receive(request, folder, name, size)
        try:
            if name.endswith(".json"):
                await asyncio.to_thread(_check_json, part, name)
            if digest != sha:
                raise ValidationError(f"{name}: sha256 of the {size} bytes received is "
                                      f"{digest}, not the {sha} named; upload it again")
            # The lease may have ended while the body streamed in.
            coord.scheduler.check_lease(task.task_id, lease_id, worker_id)
            await asyncio.to_thread(part.replace, folder / name)
        except BaseException:
            await asyncio.to_thread(part.unlink, missing_ok=True)
            raise
    finally:
        del ups.receiving[name]
    ups.done[name] = {"bytes": size, "sha256": digest}
    request.app[METRICS].bytes_in.labels("export", "file").inc(size)
    return web.json_response({"path": name, **ups.done[name]}, status=201)


async def _receive(request: web.Request, folder: Path, name: str, size: int
                   ) -> tuple[Path, str]:
    """Stream exactly ``size`` bytes of the body into a fresh temporary file in
    ``folder`` (fsynced), off the event loop a chunk at a time, hashing each
    chunk as it is written; the file and its sha256."""
    def open_part():
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=".part-", dir=folder)
        return os.fdopen(fd, "wb"), Path(path)

    fh, part = await asyncio.to_thread(open_part)
    h = hashlib.sha256()
    got = 0
    ok = False
    try:
        while chunk := await request.content.read(_CHUNK):
            got += len(chunk)
            if got > size:
                raise PayloadTooLargeError(f"{name}: more bytes than its Content-Length")
            await asyncio.to_thread(_write_hashed, fh, h, chunk)
        if got != size:
            raise ValidationError(f"{name}: {got} of {size} bytes arrived; upload it again")
        await asyncio.to_thread(_sync, fh)
        ok = True
    finally:
        await asyncio.to_thread(fh.close)
        if not ok:
            await asyncio.to_thread(part.unlink, missing_ok=True)
    return part, h.hexdigest()


def _write_hashed(fh, h, chunk: bytes) -> None:
    fh.write(chunk)
    h.update(chunk)


def _check_json(path: Path, name: str) -> None:
    """A JSON file (a sharded model's index) must parse."""
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise ValidationError(f"{name}: a JSON file of a model is at most "
                              f"{_MAX_JSON_BYTES >> 20} MiB")
    try:
        json.loads(path.read_bytes())
    except ValueError:
        raise ValidationError(f"{name} is not valid JSON") from None


def _sync(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())
