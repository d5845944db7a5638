"""Federated jobs seen from the SDK: status, cancel, and a wait that long-polls
for changes with a progress bar."""

from __future__ import annotations

import time
from typing import Any

from rewardsignal.errors import RequestTimeoutError

WAIT_CHUNK_S = 30.0


def _with_latest(st: dict) -> dict:
    """The job as the SDK shows it: ``train_loss`` / ``eval_loss`` are the latest
    numbers (None before there is one), their histories (one entry per round;
    eval starts with the loss before training) are ``*_history``."""
    out = dict(st)
    for key in ("train_loss", "eval_loss"):
        history = st.get(f"{key}_history", st.get(key))
        if not isinstance(history, list):
            continue
        out[f"{key}_history"] = history
        out[key] = next((x for x in reversed(history) if x is not None), None)
    return out


class AsyncFederatedJob:
    """A federated job running on the coordinator."""

    def __init__(self, client: Any, job_id: str, request_id: str) -> None:
        # ``client``: the AsyncSignalClient (not imported: it imports this module).
        self.client = client
        self.job_id = job_id
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"FederatedJob({self.job_id!r})"

    async def status(self) -> dict:
        """Round, version, accepted/rejected counts, the latest ``train_loss`` and
        ``eval_loss``, and their per-round ``train_loss_history`` /
        ``eval_loss_history``."""
        return _with_latest(await self.client._http("GET", f"/v1/jobs/{self.job_id}"))

    async def cancel(self) -> dict:
        """Stop the job after its current round (the run keeps what it reached)."""
        return _with_latest(await self.client._http("POST", f"/v1/jobs/{self.job_id}/cancel",
                                                    body={}))

    async def wait(self, timeout: float | None = None, *, progress: bool = True) -> dict:
        """Block until the job ends (long-polling for changes), with a progress
        bar of rounds and losses. Raises ``RequestTimeoutError`` after
        ``timeout`` seconds (the job keeps running)."""
        from rewardsignal.progress import ProgressBar

        deadline = time.monotonic() + timeout if timeout else None
        st = await self.status()
        bar = ProgressBar(st["rounds"], desc=f"{self.job_id}") if progress else None
        shown = 0
        while True:
            if bar is not None and st["round"] > shown:
                bar.update(st["round"] - shown, train=st["train_loss"] or 0.0,
                           eval=(st["eval_loss"] if st["eval_loss"] is not None
                                 else float("nan")), version=st["version"])
                shown = st["round"]
            if st["finished"]:
                return st
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise RequestTimeoutError(f"job {self.job_id} still {st['status']} after "
                                          f"{timeout}s (round {st['round']}/{st['rounds']})")
            chunk = WAIT_CHUNK_S if left is None else max(min(WAIT_CHUNK_S, left), 0.01)
            st = _with_latest(await self.client._http(
                "GET", f"/v1/jobs/{self.job_id}",
                params={"timeout_s": f"{chunk:.3f}", "after": st["stamp"]},
                timeout_s=chunk + 30))
