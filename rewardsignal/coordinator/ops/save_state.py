"""``save_state``: export the current version (or an earlier one still kept) as a
named PEFT adapter or merged model (pinned past checkpoint retention). A
merged model is made by a worker that can hold the run, never on the
coordinator."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from rewardsignal.checkpoints.export import check_merged, write_merged_config
from rewardsignal.checkpoints.store import check_name
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.ops.tasks import gather_tasks
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services
from rewardsignal.errors import NotFoundError, TaskFailedError, ValidationError
from rewardsignal.lora import adapter_config_json
from rewardsignal.memory import weight_bytes
from rewardsignal.protocol import tensors_from_bytes

log = logging.getLogger("signal.coordinator")


class SaveState(Operation):
    name = "save_state"
    barrier = True

    async def parse(self, ctx: Services, run: Run, owner: str, body: Body) -> dict:
        mode = body.str("mode", "adapter", choices=("adapter", "merged"))
        name = body.str("name", None, max_len=64)
        if name is not None:
            check_name(name)
        version = body.int("version", None, lo=0, hi=run.version)
        if version is not None and version not in await asyncio.to_thread(
                ctx.versions.store.versions, run.run_id):
            raise NotFoundError(f"run {run.run_id} no longer keeps version {version} (only the "
                                "newest checkpoints and saved states are kept)")
        return {"mode": mode, "name": name, "version": version}

    async def execute(self, ctx: Services, run: Run, request: Request, args: dict) -> dict:
        mode = args["mode"]
        version = run.version if args.get("version") is None else args["version"]
        name = args.get("name") or (f"v{version:06d}" + ("-merged" if mode == "merged"
                                                           else ""))
        # Named states are synchronous: the version's checkpoint (maybe still being
        # written in the background) lands before it is pinned and exported.
        await ctx.versions.flush(run.run_id)
        precision = run.spec.precision.to_json()
        if mode == "adapter":
            meta = await asyncio.to_thread(ctx.artifacts.save, run.run_id, version, mode, name,
                                           precision=precision)
        else:
            found = await asyncio.to_thread(ctx.artifacts.existing, run.run_id, version, mode,
                                            name)
            meta = found or await _merge_on_a_worker(ctx, run, request, version, name,
                                                     precision)
        log.info("state saved run=%s version=%d name=%s mode=%s", run.run_id, version, name,
                 mode)
        return meta


# Room for a sharded model's index beside its weights at fp32.
_EXPORT_SLACK_BYTES = 64 << 20
# The bound when the model's config could not be read (no size estimate).
_EXPORT_UNKNOWN_BYTES = 2 << 40
# Workers a merged export is tried on before the request fails: one whose
# weights are refused is not asked again.
_EXPORT_ATTEMPTS = 3


def export_budget(run: Run) -> int:
    """The most bytes a worker may upload for a merged export of ``run``: its
    base's weights at fp32 (what a merge loads) and a little over."""
    if run.shape is None:
        return _EXPORT_UNKNOWN_BYTES
    return int(weight_bytes(run.shape, "fp32") * 1.05) + _EXPORT_SLACK_BYTES


async def _merge_on_a_worker(ctx: Services, run: Run, request: Request, version: int, name: str,
                             precision: dict) -> dict:
    """A merged model is made by a worker that can hold the run (the coordinator
    never loads a base): it merges ``version``'s adapter into the full-precision
    base and uploads the weights (``PUT /v1/tasks/{task_id}/files/{name}``, each
    measured and hashed by the coordinator as it is written), listing them in
    its result. The coordinator then checks them against the base and the
    adapter, one tensor at a time (``checkpoints.export.check_merged``), and
    writes the config and tokenizer from the base's own files. Refused weights
    mark the worker (as a rejected update does) and another worker is asked."""
    adapter_path = ctx.versions.adapter_file(run.run_id, version)
    source = f"signal://{run.run_id}/v{version:06d}"
    refused: set[str] = set()
    last = ""
    for _ in range(_EXPORT_ATTEMPTS):
        task = ctx.scheduler.add_task(
            kind="export_merged", run_id=run.run_id, base_model=run.spec.base_model,
            version=version, group=run.spec.owner, tokens=1, exclude=frozenset(refused),
            payload={"adapter_config": adapter_config_json(run.spec.lora, run.spec.base_model),
                     "max_bytes": export_budget(run), "precision": precision,
                     "source": source})

        def complete(folder: Path) -> None:
            adapter = tensors_from_bytes(adapter_path.read_bytes())
            dtype = check_merged(folder, run.spec.base_model, adapter, run.spec.lora.to_json())
            write_merged_config(folder, run.spec.base_model, dtype, precision, source)

        try:
            async for _, result in gather_tasks(ctx.scheduler, [task], request,
                                                run.spec.base_model,
                                                ctx.config.no_worker_grace_s):
                try:
                    return await asyncio.to_thread(
                        ctx.artifacts.adopt, run.run_id, version, "merged", name, task.task_id,
                        result["lease_id"], result["files"], precision, complete)
                except ValidationError as exc:
                    last = exc.message
                    worker = ctx.scheduler.workers.get(task.done_by)
                    refused.add(task.done_by)
                    if worker is not None:
                        ctx.scheduler.note_rejection(worker, "export")
                    log.warning("merged export refused run=%s worker=%s: %s", run.run_id,
                                task.done_by, exc.message)
        finally:
            await asyncio.to_thread(ctx.artifacts.drop_uploads, run.run_id, task.task_id)
    raise TaskFailedError(f"merged export of run {run.run_id} version {version} refused from "
                          f"{len(refused)} workers; last: {last}")

