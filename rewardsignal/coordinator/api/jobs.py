"""Request, dataset and federated-job endpoints."""

from __future__ import annotations

import asyncio

from aiohttp import web

from rewardsignal.coordinator.api.appkeys import AUTH, COORDINATOR
from rewardsignal.coordinator.api.bodies import MAX_WAIT_S, query_float, read_raw, reply
from rewardsignal.coordinator.coordinator import Coordinator
from rewardsignal.coordinator.federated.job import FederatedJob
from rewardsignal.errors import NotFoundError, http_status_for


async def request_state(coord: Coordinator, request_id: str, owner: str, timeout_s: float
                        ) -> dict:
    """What ``GET /v1/requests/{id}`` answers, after waiting up to ``timeout_s``
    for the request to finish."""
    try:
        return (await coord.requests.wait(request_id, owner, timeout_s)).to_json()
    except NotFoundError:
        # Finished before the coordinator last restarted: the database has it.
        old = await coord.services.db.finished_request(request_id)
        if old is None or old["owner"] != owner:
            raise
        return {"request_id": request_id, "run_id": old["run_id"], "kind": old["kind"],
                "status": old["status"],
                **({"result": old["result"]} if old["status"] == "done" else old["result"])}


async def wait_request(request: web.Request) -> web.Response:
    owner = await request.app[AUTH].user(request)
    timeout_s = query_float(request, "timeout_s", 30.0, MAX_WAIT_S)
    body = await request_state(request.app[COORDINATOR], request.match_info["request_id"],
                               owner, timeout_s)
    if body["status"] == "failed":
        return web.json_response(body, status=http_status_for(body["error"]["code"]))
    return reply(request, body, status=200 if body["status"] == "done" else 202)


async def upload_dataset(request: web.Request) -> web.Response:
    owner = await request.app[AUTH].user(request)
    raw = await read_raw(request)
    name = request.query.get("name", "dataset.jsonl")[:128]
    datasets = request.app[COORDINATOR].services.datasets
    meta = await asyncio.to_thread(datasets.save, owner, raw, name)
    return web.json_response(meta, status=201)


async def _job(request: web.Request) -> FederatedJob:
    owner = await request.app[AUTH].user(request)
    job = request.app[COORDINATOR].jobs.get(request.match_info["job_id"])
    if job is None or job.owner != owner:
        raise NotFoundError(f"unknown job {request.match_info['job_id']}")
    return job


async def run_jobs(request: web.Request) -> web.Response:
    """GET /v1/runs/{run_id}/jobs: the run's federated jobs, oldest first."""
    owner = await request.app[AUTH].user(request)
    coord = request.app[COORDINATOR]
    run = coord.run_for(owner, request.match_info["run_id"])
    jobs = [{k: v for k, v in j.to_json().items() if k != "config"}
            for j in coord.jobs.values() if j.run_id == run.run_id]
    return web.json_response({"jobs": jobs})


async def get_job(request: web.Request) -> web.Response:
    """Long-poll: answers at once, or (with ``timeout_s``) when the job changes."""
    job = await _job(request)
    timeout_s = query_float(request, "timeout_s", 0.0, MAX_WAIT_S)
    seen = request.query.get("after")
    if timeout_s > 0 and seen == job.stamp() and not job.to_json()["finished"]:
        try:
            await asyncio.wait_for(job.changed.wait(), timeout_s)
        except TimeoutError:
            pass
    return web.json_response({**job.to_json(), "stamp": job.stamp()})


async def cancel_job(request: web.Request) -> web.Response:
    job = await _job(request)
    job.cancel()
    return web.json_response({**job.to_json(), "stamp": job.stamp()})
