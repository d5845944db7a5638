"""A dishonest volunteer for tests and ``bench/adversary.py``: a real worker
process (the real protocol, registration, leases, uploads) that returns a
plausible but wrong ``forward_backward`` gradient (or federated ``train``
delta) on a share of its tasks, with the honest loss and logprobs (or metrics)
beside it, so that every pure check passes.

    python tests/adversary_worker.py --coordinator URL --name evil --mode flip \\
        [--cheat-fraction 1.0] [--honest-first 0] [--seed 0] [--threads 1]

Modes: ``flip`` (the gradient or delta negated), ``scale`` (5x), ``other`` (the
gradient or delta of other data: each sequence's tokens reversed).
"""

from __future__ import annotations

import argparse
import asyncio
import random

from rewardsignal import protocol
from rewardsignal.aggregation.codecs import decode, encode
from rewardsignal.worker.loop import Worker, WorkerConfig

MODES = ("flip", "scale", "other")


def _reversed_payload(payload: dict) -> dict:
    """The same shapes over other data: each datum's tokens in reverse order."""
    datums = []
    for d in payload["datums"]:
        ids = list(reversed(d["model_input"]))
        inputs = d["loss_fn_inputs"]
        datums.append({"model_input": ids, "loss_fn_inputs": {
            **inputs, "target_tokens": ids[1:] + ids[:1]}})
    return {**payload, "datums": datums}


class Adversary(Worker):
    def __init__(self, config: WorkerConfig, mode: str, cheat_fraction: float, seed: int,
                 honest_first: int = 0) -> None:
        super().__init__(config)
        self.honest_first = honest_first
        self.gradients = 0
        self.mode = mode
        self.cheat_fraction = cheat_fraction
        self.rng = random.Random(seed)
        self.cheated = 0

    def _compute(self, task: dict, adapter: dict) -> dict:
        msg = super()._compute(task, adapter)
        if task["kind"] not in ("forward_backward", "train"):
            return msg
        self.gradients += 1
        if self.gradients <= self.honest_first or self.rng.random() >= self.cheat_fraction:
            return msg
        codec = msg["codec"]
        if self.mode == "other":
            wrong = super()._compute({**task, "payload": _reversed_payload(task["payload"])},
                                     adapter)
            msg["tensors"] = wrong["tensors"]
        else:
            grads = decode(protocol.tensors_from_bytes(msg["tensors"]), codec)
            factor = -1.0 if self.mode == "flip" else 5.0
            msg["tensors"] = protocol.tensors_to_bytes(
                encode({k: v * factor for k, v in grads.items()}, codec))
        self.cheated += 1
        self.status.event(f"cheated ({self.mode}) on task {task['task_id']}")
        return msg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--name", default="adversary")
    ap.add_argument("--token", default=None)
    ap.add_argument("--mode", choices=MODES, default="flip")
    ap.add_argument("--cheat-fraction", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--honest-first", type=int, default=0,
                    help="compute this many gradients (or deltas) honestly before cheating")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens-per-task", type=int, default=None)
    args = ap.parse_args()
    config = WorkerConfig(coordinator=args.coordinator, token=args.token, device="cpu",
                          name=args.name, threads=args.threads,
                          max_tokens_per_task=args.max_tokens_per_task)
    return asyncio.run(Adversary(config, args.mode, args.cheat_fraction, args.seed,
                                 args.honest_first).run())


if __name__ == "__main__":
    raise SystemExit(main())
