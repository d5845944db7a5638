"""``load_state``: replace a run's weights (and, if asked, its optimizer state)
with a saved state of a run of the same shape: version v+1.

The source is a saved state by name (``save_state``) or a version still on
disk, of this run or another run of the same owner. Gradients accumulated
since the last step were taken on the old weights, so they are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from rewardsignal.coordinator.fields import Body
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.runs.accumulator import Accumulator
from rewardsignal.coordinator.runs.requests import Request
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services
from rewardsignal.errors import NotFoundError, ValidationError

log = logging.getLogger("signal.coordinator")


@dataclass(frozen=True)
class LoadArgs:
    source_run: str
    version: int
    optimizer: bool


def check_compatible(run: Run, source: Run) -> None:
    """Same base and the same adapter tensors (names and shapes), or a clear 400."""
    if source.spec.base_model != run.spec.base_model:
        raise ValidationError(f"run {source.run_id} is a {source.spec.base_model} adapter; run "
                              f"{run.run_id} is on {run.spec.base_model}")
    if source.shapes != run.shapes:
        raise ValidationError(f"run {source.run_id}'s adapter (rank {source.spec.lora.r}, "
                              f"{sorted(source.spec.lora.target_modules)}) does not have run "
                              f"{run.run_id}'s shapes (rank {run.spec.lora.r}, "
                              f"{sorted(run.spec.lora.target_modules)})")


class LoadState(Operation):
    name = "load_state"
    barrier = True

    async def parse(self, ctx: Services, run: Run, owner: str, body: Body) -> LoadArgs:
        source_id = body.str("from_run", run.run_id, max_len=128)
        source = ctx.runs.get(source_id)
        if source is None or source.spec.owner != owner:
            raise NotFoundError(f"unknown run {source_id}")
        check_compatible(run, source)
        name = body.str("name", None, max_len=64)
        version = body.int("version", None, lo=0)
        if (name is None) == (version is None):
            raise ValidationError("give exactly one of 'name' (a saved state) or 'version'")
        store = ctx.versions.store
        if name is not None:
            names = await asyncio.to_thread(store.names, source_id)
            if name not in names:
                raise NotFoundError(f"run {source_id} has no saved state named {name!r}")
            version = names[name]
        assert version is not None
        await ctx.versions.adapter_sha256(source_id, version)  # 404 if pruned / never written
        return LoadArgs(source_id, version, body.bool("optimizer", False))

    def dump(self, args: LoadArgs) -> dict:
        return dict(args.__dict__)

    def load(self, ctx: Services, run: Run, data: dict) -> LoadArgs:
        return LoadArgs(**data)

    def recovered(self, run: Run, request_id: str, manifest: dict) -> dict | None:
        if manifest.get("request_id") != request_id:
            return None
        return {"version": run.version, "recovered": True}

    async def execute(self, ctx: Services, run: Run, request: Request, args: LoadArgs) -> dict:
        # The source version's checkpoint may still be being written in the background.
        await ctx.versions.flush(args.source_run)
        ck = await asyncio.to_thread(ctx.versions.store.load, args.source_run, args.version)
        state = ck.optimizer if args.optimizer else {}
        step = int(ck.manifest.get("optimizer_step", 0)) if args.optimizer else 0
        entry = {"version": run.version + 1, "loss": None, "tokens": 0, "time": time.time(),
                 "loaded_from": f"{args.source_run}@{args.version}"}
        await ctx.versions.commit(run, dict(ck.adapter), dict(state), history_entry=entry,
                                  opt_step=step, request_id=request.request_id)
        run.accum = Accumulator()
        await ctx.pending.drop_before(run.run_id, run.version)
        log.info("state loaded run=%s version=%d from=%s optimizer=%s", run.run_id, run.version,
                 entry["loaded_from"], args.optimizer)
        return {"version": run.version, "loaded_from": entry["loaded_from"],
                "optimizer": args.optimizer, "step": step}
