"""The native HTTP front end (``/v1``): parse, call the coordinator, encode.

Handlers do no domain work; each module serves one audience (``site``: open
and overview endpoints, ``runs``, ``jobs``: requests, datasets and jobs,
``workers``). Every route is listed here and documented in ``docs/protocol.md``.
"""

from __future__ import annotations

from aiohttp import web

from rewardsignal.coordinator.api import channel, jobs, runs, site, workers


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", site.dashboard)
    app.router.add_get("/healthz", site.healthz)
    app.router.add_get("/v1/status", site.status)
    app.router.add_get("/metrics", site.metrics)
    app.router.add_get("/v1/models", site.list_models)
    app.router.add_get("/v1/workers", site.list_workers)
    app.router.add_post("/v1/runs", runs.create_run)
    app.router.add_get("/v1/runs", runs.list_runs)
    app.router.add_get("/v1/runs/{run_id}", runs.get_run)
    app.router.add_delete("/v1/runs/{run_id}", runs.delete_run)
    app.router.add_get("/v1/runs/{run_id}/artifacts", runs.list_artifacts)
    app.router.add_get("/v1/runs/{run_id}/jobs", jobs.run_jobs)
    # Before the operations' route, which would take "requests" for an operation.
    app.router.add_post("/v1/runs/{run_id}/requests", runs.run_requests)
    app.router.add_post("/v1/runs/{run_id}/{op}", runs.run_op)
    app.router.add_get("/v1/runs/{run_id}/weights/{version}", runs.get_weights)
    app.router.add_get("/v1/runs/{run_id}/artifacts/{name}", runs.get_artifact)
    app.router.add_get("/v1/runs/{run_id}/artifacts/{name}/files/{filename}",
                       runs.get_artifact_file)
    app.router.add_get("/v1/requests/{request_id}", jobs.wait_request)
    app.router.add_post("/v1/datasets", jobs.upload_dataset)
    app.router.add_get("/v1/jobs/{job_id}", jobs.get_job)
    app.router.add_post("/v1/jobs/{job_id}/cancel", jobs.cancel_job)
    app.router.add_post("/v1/workers/register", workers.register_worker)
    app.router.add_post("/v1/workers/{worker_id}/lease", workers.lease_task)
    app.router.add_get("/v1/workers/{worker_id}/channel", channel.worker_channel)
    app.router.add_post("/v1/workers/{worker_id}/heartbeat", workers.heartbeat)
    app.router.add_post("/v1/workers/{worker_id}/upload-slot", workers.upload_slot)
    app.router.add_post("/v1/workers/{worker_id}/goodbye", workers.goodbye)
    app.router.add_post("/v1/tasks/{task_id}/result", workers.submit_result)
    app.router.add_put("/v1/tasks/{task_id}/files/{name}", workers.upload_file)
