"""Running one queued operation: its timeout, and its outcome made the
request's result (in memory for waiting clients, in the database for ones
that come back after a restart)."""

from __future__ import annotations

import asyncio
import logging

from rewardsignal import tracing
from rewardsignal.coordinator.ops.base import Operation
from rewardsignal.coordinator.runs.processor import Op
from rewardsignal.coordinator.runs.state import Run
from rewardsignal.coordinator.services import Services
from rewardsignal.errors import NoWorkerError, RequestTimeoutError, SignalError

log = logging.getLogger("signal.coordinator")

# Waits between attempts to store a finished request's outcome.
_FINISH_RETRY_S = (0.1, 0.5, 2.0, 5.0)


def _timeout_error(ctx: Services, run: Run, op: Op) -> SignalError:
    base = run.spec.base_model
    if not ctx.scheduler.eligible_workers(base, run.run_id):
        return NoWorkerError(
            f"no worker can serve base model {base} (run {run.run_id}, "
            f"{run.spec.precision.label()} base): none connected within "
            f"{op.timeout_s:g}s. Start one with `signal-worker --coordinator URL`.")
    return RequestTimeoutError(f"{op.operation.name} did not finish within {op.timeout_s:g}s")


async def execute(ctx: Services, run: Run, op: Op) -> None:
    operation = op.operation
    assert isinstance(operation, Operation)
    fut = op.request.future
    tracing.mark(f"coordinator: {operation.name} begins")
    try:
        if not operation.starts_unstored:
            await op.request.until_stored()
        timeout = op.timeout_s if operation.bounded else None
        result = await asyncio.wait_for(operation.execute(ctx, run, op.request, op.args),
                                        timeout)
    except SignalError as exc:  # before TimeoutError: NoWorkerError is one too
        if not fut.done():
            fut.set_exception(exc)
    except TimeoutError:
        err = _timeout_error(ctx, run, op)
        log.warning("request failed request=%s run=%s reason=%s", op.request.request_id,
                    run.run_id, err.code)
        if not fut.done():
            fut.set_exception(err)
    except Exception as exc:  # a bug, not bad input: log it fully, fail only this request
        if not op.request.store_failed():  # else submit() failed it and told its caller
            log.exception("request crashed request=%s run=%s", op.request.request_id,
                          run.run_id)
            if not fut.done():
                fut.set_exception(SignalError(f"internal error: {type(exc).__name__}: {exc}"))
    else:
        if not fut.done():
            fut.set_result(result)
    operation.answered(ctx, run)
    tracing.mark(f"coordinator: {operation.name} ends")
    if op.request.store_failed():  # never in the database: nothing to finish there
        return
    body = op.request.to_json()
    if body["status"] == "done" and body["result"] is op.request.stored_result:
        return  # stored by the operation, with its effect
    outcome: dict = body["result"] if body["status"] == "done" else {"error": body["error"]}
    # A failed write is retried: while the request's row says pending, a restart
    # would run it again, and a step after it could not be told apart from it.
    for delay in (*_FINISH_RETRY_S, None):
        try:
            await ctx.db.finish_request(op.request.request_id, body["status"], outcome,
                                        keep_args=operation.replayable
                                        and body["status"] == "done")
            return
        except Exception:
            if delay is None:  # the run's queue stops behind it (a barrier's does)
                log.exception("request finished but its outcome could not be stored "
                              "request=%s run=%s; check the disk, then restart",
                              op.request.request_id, run.run_id)
                raise
            log.warning("storing the outcome of request=%s failed; retrying in %gs",
                        op.request.request_id, delay)
            await asyncio.sleep(delay)
