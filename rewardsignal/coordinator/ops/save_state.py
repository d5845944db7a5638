"""``save_state``: export the current version (or an earlier one still kept) as a
named PEFT adapter or merged model (pinned past checkpoint retention)."""

from __future__ import annotations

import asyncio
import logging

from rewardsignal.checkpoints.store import check_name
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services
from rewardsignal.errors import NotFoundError

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
        meta = await asyncio.to_thread(ctx.artifacts.save, run.run_id, version,
                                       run.spec.base_model, mode, name,
                                       precision=run.spec.precision.to_json())
        log.info("state saved run=%s version=%d name=%s mode=%s", run.run_id, version, name,
                 mode)
        return meta
