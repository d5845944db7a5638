"""A dishonest volunteer against verification by recomputation.

Synchronous training (forward_backward + optim_step) on signal-small with 4
worker processes, one of which is ``tests/adversary_worker.py``: a real worker
that returns a wrong gradient (with the honest loss and logprobs) on a share of
its tasks: (a) sign-flipped, (b) 5x scaled (no norm bound is set, so it passes
every pure check), (c) the gradient of other data. Reference, in the same
benchmark run: the same training with 4 honest workers.

Per mode and seed it prints the final LoRA weights' relative L2 difference from
the all-honest run (target <= 1e-3: the adversary's work never landed), the
tasks the adversary completed until it was quarantined, and the compute
overhead (check tasks / all tasks); then the same modes with
``--verify-fraction 0`` for contrast (how far the weights go).

    python bench/adversary.py [--steps 4] [--batch 16] [--seeds 3] [--cheat-fraction 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from _cluster import Cluster

ADVERSARY = str(Path(__file__).resolve().parents[1] / "tests" / "adversary_worker.py")
MODEL = "signal-small"
TASK_TOKENS = "256"


def rel_l2(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5
    den = sum(float(b[k].double().pow(2).sum()) for k in b) ** 0.5
    return num / den


def trial(batch: list, steps: int, *, mode: str | None, seed: int, fraction: str,
          cheat_fraction: float) -> dict:
    """One training run; the final weights and what the coordinator saw."""
    honest = 4 if mode is None else 3
    with Cluster(honest, threads=1, coordinator_args=("--verify-fraction", fraction),
                 worker_args=("--max-tokens-per-task", TASK_TOKENS)) as cluster:
        if mode is not None:
            cluster.procs.append(subprocess.Popen(
                [sys.executable, ADVERSARY, "--coordinator", cluster.url, "--name", "evil",
                 "--mode", mode, "--cheat-fraction", str(cheat_fraction), "--seed", str(seed),
                 "--max-tokens-per-task", TASK_TOKENS],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 120
            while len(cluster.client.list_workers()) < 4:
                if time.monotonic() > deadline:
                    raise SystemExit("the adversary did not register")
                time.sleep(0.2)
        run = cluster.client.create_run(base_model=MODEL, lora_r=8, learning_rate=1e-3, seed=5)
        half = len(batch) // 2
        version = 0
        for _ in range(steps):
            run.forward_backward(batch=batch[:half])
            run.forward_backward(batch=batch[half:])
            version = run.optim_step()["version"]
        from rewardsignal.protocol import tensors_from_bytes

        weights = tensors_from_bytes(cluster.client._loop.run(cluster.client._target._http(
            "GET", f"/v1/runs/{run.run_id}/weights/{version}", raw=True)))
        status = json.loads(urllib.request.urlopen(cluster.url + "/v1/status", timeout=10).read())
        evil = next((w for w in status["workers"] if w["name"] == "evil"), None)
        checks = cluster.metric("signal_verification_tasks_total")
        all_tasks = cluster.metric("signal_updates_accepted_total", kind="forward_backward")
        return {"weights": weights, "checks": checks, "tasks": all_tasks,
                "caught": evil is not None and evil["status"] == "quarantined",
                "evil_tasks": evil["tasks_completed"] if evil else 0}


def main() -> None:
    from rewardsignal.data import sample_examples
    from rewardsignal.models import resolve_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cheat-fraction", type=float, default=0.5)
    args = ap.parse_args()
    resolve_model_path(MODEL)
    batch = sample_examples()[: args.batch]
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}")
    print(f"model {MODEL}, {args.steps} steps of 2 x {args.batch // 2} examples, 4 workers "
          f"(1 thread each), shards of <= {TASK_TOKENS} tokens, adversary cheats on "
          f"{args.cheat_fraction:.0%} of its gradients")
    started = time.monotonic()
    ref = trial(batch, args.steps, mode=None, seed=0, fraction="0.05", cheat_fraction=0)
    print(f"reference (4 honest, verification on): overhead "
          f"{ref['checks'] / ref['tasks']:.3f} ({ref['checks']:.0f} check tasks of "
          f"{ref['tasks']:.0f})", flush=True)
    again = trial(batch, args.steps, mode=None, seed=0, fraction="0", cheat_fraction=0)
    print(f"honest run again, verification off: rel L2 vs reference "
          f"{rel_l2(again['weights'], ref['weights']):.2e}", flush=True)
    for mode in ("flip", "scale", "other"):
        diffs, until, overhead, caught = [], [], [], 0
        for seed in range(args.seeds):
            t = trial(batch, args.steps, mode=mode, seed=seed, fraction="0.05",
                      cheat_fraction=args.cheat_fraction)
            diffs.append(rel_l2(t["weights"], ref["weights"]))
            overhead.append(t["checks"] / t["tasks"])
            if t["caught"]:
                caught += 1
                until.append(t["evil_tasks"])
            print(f"  {mode} seed {seed}: rel L2 {diffs[-1]:.2e}, caught {t['caught']} after "
                  f"{t['evil_tasks']} tasks, overhead {overhead[-1]:.3f}", flush=True)
        off = trial(batch, args.steps, mode=mode, seed=0, fraction="0",
                    cheat_fraction=args.cheat_fraction)
        print(f"{mode}: max rel L2 vs honest {max(diffs):.2e} (target <= 1e-3); caught "
              f"{caught}/{args.seeds}, tasks until quarantine median "
              f"{statistics.median(until) if until else '-'} max {max(until) if until else '-'}"
              f"; overhead median {statistics.median(overhead):.3f}; verification off: rel L2 "
              f"{rel_l2(off['weights'], ref['weights']):.2e}", flush=True)
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
