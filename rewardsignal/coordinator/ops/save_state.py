"""``save_state``: export the current version as a named PEFT adapter or merged
model (pinned past checkpoint retention)."""

from __future__ import annotations

import asyncio
import logging

from rewardsignal.checkpoints.store import check_name
from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services

log = logging.getLogger("signal.coordinator")


class SaveState(Operation):
    name = "save_state"
    barrier = True

    async def parse(self, ctx: Services, run: Run, owner: str, body: Body) -> dict:
        mode = body.str("mode", "adapter", choices=("adapter", "merged"))
        name = body.str("name", None, max_len=64)
        if name is not None:
            check_name(name)
        return {"mode": mode, "name": name}

    async def execute(self, ctx: Services, run: Run, request: Request, args: dict) -> dict:
        mode = args["mode"]
        name = args.get("name") or (f"v{run.version:06d}" + ("-merged" if mode == "merged"
                                                               else ""))
        # Named states are synchronous: the version's checkpoint (maybe still being
        # written in the background) lands before it is pinned and exported.
        await ctx.versions.flush(run.run_id)
        meta = await asyncio.to_thread(ctx.artifacts.save, run.run_id, run.version,
                                       run.spec.base_model, mode, name,
                                       precision=run.spec.precision.to_json())
        log.info("state saved run=%s version=%d name=%s mode=%s", run.run_id, run.version, name,
                 mode)
        return meta
