"""Federated rounds on signal-small: codecs, communication vs the sync path, robustness.

Prints, in one run:
  (a) bytes per update of each codec relative to fp32 (target int8 <= 0.27) and
      final eval loss relative to fp32 (target <= 1.01);
  (b) bytes exchanged to reach a target eval loss: K-local-step rounds with a
      Nesterov outer step vs one gradient exchange per step (the sync path);
      target >= 10x fewer bytes;
  (c) with one of four workers adversarial, final eval loss with trimmed mean
      relative to an all-honest run (target <= 1.05), and with plain mean.

    python bench/federated.py [--model signal-small] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import threading
import time

import aiohttp
import torch
from _cluster import Cluster

from rewardsignal.data import sample_examples

TRAIN, HELD_OUT = slice(0, 200), slice(200, None)


def _job(cluster: Cluster, model: str, *, rounds: int, seed: int = 0, **kw) -> dict:
    run = cluster.client.create_run(base_model=model, lora_r=8, learning_rate=2e-3, seed=seed)
    ex = sample_examples()
    job = run.train_federated(ex[TRAIN], eval_dataset=ex[HELD_OUT], rounds=rounds, seed=seed,
                              round_timeout_s=600, **kw)
    st = job.wait(timeout=3600, progress=False)
    if st["status"] != "done":
        raise SystemExit(f"job failed: {st['reason']}")
    return st


def part_a(model: str, rounds: int) -> list[dict]:
    rows = []
    for codec in ("fp32", "fp16", "bf16", "int8"):
        with Cluster(2, threads=1) as c:
            st = _job(c, model, rounds=rounds, local_steps=8, batch_size=8, tasks_per_round=2,
                      codec=codec, inner_learning_rate=2e-3)
            received = c.metric("signal_bytes_received_total", kind="delta", codec=codec)
        rows.append({"codec": codec, "bytes_per_update": received / st["accepted"],
                     "eval": st["eval_loss"]})
        print(f"  (a) {codec}: {rows[-1]['bytes_per_update']:,.0f} B/update, final eval "
              f"{rows[-1]['eval']:.4f}", flush=True)
    base = rows[0]
    for r in rows:
        r["bytes_ratio"] = r["bytes_per_update"] / base["bytes_per_update"]
        r["eval_ratio"] = r["eval"] / base["eval"]
    return rows


def part_b(model: str, target: float, max_steps: int, max_rounds: int,
           local_steps: int = 32) -> dict:
    ex = sample_examples()
    with Cluster(2, threads=1) as c:
        run = c.client.create_run(base_model=model, lora_r=8, learning_rate=2e-3)
        sync_bytes, reached, steps, evals = 0.0, None, 0, []
        for step in range(1, max_steps + 1):
            start = (step * 16) % 200
            batch = (ex[TRAIN] + ex[TRAIN])[start:start + 16]
            run.forward_backward(batch=batch)
            run.optim_step()
            steps = step
            if step % 2 == 0:
                grads = c.metric("signal_bytes_received_total", kind="gradient")
                weights = c.metric("signal_bytes_served_total", kind="weights")
                loss = run.forward(ex[HELD_OUT])["loss"]
                evals.append(loss)
                if loss <= target:
                    sync_bytes, reached = grads + weights, loss
                    break
        if reached is None:
            sync_bytes = c.metric("signal_bytes_received_total", kind="gradient") + c.metric(
                "signal_bytes_served_total", kind="weights")
    sync = {"steps": steps, "bytes": sync_bytes, "reached": reached, "evals": evals}
    print(f"  (b) sync: {steps} steps, {sync_bytes / 1e6:.1f} MB, eval {evals[-1]:.4f}",
          flush=True)
    with Cluster(2, threads=1) as c:
        run = c.client.create_run(base_model=model, lora_r=8, learning_rate=2e-3)
        fed_reached, rounds = None, 0
        for rounds in range(1, max_rounds + 1):
            job = run.train_federated(ex[TRAIN], eval_dataset=ex[HELD_OUT], rounds=1,
                                      local_steps=local_steps, batch_size=8,
                                      tasks_per_round=2,
                                      outer_optimizer="nesterov", inner_learning_rate=2e-3,
                                      seed=rounds, round_timeout_s=600)
            st = job.wait(timeout=1200, progress=False)
            if st["eval_loss"] <= target:
                fed_reached = st["eval_loss"]
                break
        # Weight downloads for the evaluation tasks are not part of training traffic:
        # count deltas plus one weight download per train task.
        deltas = c.metric("signal_bytes_received_total", kind="delta")
        per_update = deltas / (2 * rounds)
        fed_bytes = deltas + per_update * 2 * rounds
    fed = {"rounds": rounds, "bytes": fed_bytes, "reached": fed_reached}
    print(f"  (b) federated (K={local_steps}): {rounds} rounds, {fed_bytes / 1e6:.1f} MB, eval "
          f"{st['eval_loss']:.4f}", flush=True)
    return {"sync": sync, "fed": fed, "target": target,
            "ratio": sync["bytes"] / fed["bytes"] if fed["bytes"] else float("nan")}


class Adversary:
    """A volunteer that speaks the protocol and sends poison: for every train task,
    large random noise of the right shapes, claiming 100x the real token count
    (a plain token-weighted mean trusts that). Other tasks it gives back."""

    def __init__(self, url: str, model: str) -> None:
        from rewardsignal.models import fingerprint

        self.url, self.fp = url, fingerprint(model)
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=lambda: asyncio.run(self._loop()), daemon=True)
        self.thread.start()

    async def _loop(self) -> None:
        from rewardsignal.protocol import MSGPACK, pack, tensors_from_bytes, tensors_to_bytes

        gen = torch.Generator().manual_seed(666)
        async with aiohttp.ClientSession() as s:
            async with s.post(self.url + "/v1/workers/register",
                              json={"name": "mallory", "device": "cpu"}) as r:
                wid = (await r.json())["worker_id"]
            deadline = time.monotonic() + 3600
            while not self.stop.is_set() and time.monotonic() < deadline:
                async with s.post(f"{self.url}/v1/workers/{wid}/lease",
                                  params={"timeout_s": "1"}) as r:
                    if r.status != 200:
                        continue
                    task = await r.json()
                msg = {"worker_id": wid, "lease_id": task["lease_id"]}
                if task["kind"] != "train":
                    msg["error"] = "not my kind of task"
                else:
                    async with s.get(self.url + task["weights_url"],
                                     headers={"X-Signal-Worker": wid}) as r:
                        shapes = {k: v.shape for k, v in tensors_from_bytes(await r.read()).items()}
                    poison = {k: torch.randn(sh, generator=gen) * 0.05 for k, sh in shapes.items()}
                    tokens = 100.0 * sum(len(d["model_input"]) for d in task["payload"]["datums"])
                    msg.update(fingerprint=self.fp, version=task["version"], codec="fp32",
                               tensors=tensors_to_bytes(poison), duration_s=1.0,
                               result={"train_loss_mean": 0.1, "train_loss_last": 0.1,
                                       "grad_norm_mean": 1.0, "steps": 8.0, "num_samples": 64.0,
                                       "tokens": tokens, "duration_s": 1.0})
                    self.sent += 1
                async with s.post(f"{self.url}/v1/tasks/{task['task_id']}/result",
                                  data=pack(msg), headers={"Content-Type": MSGPACK}) as r:
                    await r.read()


def part_c(model: str, rounds: int) -> dict:
    common = dict(rounds=rounds, local_steps=8, batch_size=8, tasks_per_round=4,
                  inner_learning_rate=2e-3)
    out = {}
    with Cluster(4, threads=1, coordinator_args=("--max-task-attempts", "50")) as c:
        out["honest"] = _job(c, model, **common, aggregator="mean")["eval_loss"]
    print(f"  (c) all honest, mean: {out['honest']:.4f}", flush=True)
    for rule in ("trimmed_mean", "mean"):
        with Cluster(3, threads=1, coordinator_args=("--max-task-attempts", "50")) as c:
            adv = Adversary(c.url, model)
            try:
                out[rule] = _job(c, model, **common, aggregator=rule,
                                 trim_fraction=0.25)["eval_loss"]
            finally:
                adv.stop.set()
        print(f"  (c) 1 of 4 adversarial, {rule}: {out[rule]:.4f} (poisoned updates sent: "
              f"{adv.sent})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="signal-small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--target", type=float, default=None,
                    help="held-out loss both paths must reach in (b) (default 1.5)")
    ap.add_argument("--parts", default="abc")
    ap.add_argument("--local-steps", type=int, default=32, help="K for part (b)")
    args = ap.parse_args()
    from rewardsignal.models import resolve_model_path

    resolve_model_path(args.model)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}; "
          f"model {args.model}", flush=True)
    t0 = time.monotonic()
    if "a" in args.parts:
        rows = part_a(args.model, args.rounds)
        print("(a) codec  bytes/update  vs fp32  final eval  vs fp32")
        for r in rows:
            print(f"    {r['codec']:5s} {r['bytes_per_update']:>12,.0f}  {r['bytes_ratio']:.3f}"
                  f"    {r['eval']:.4f}     {r['eval_ratio']:.4f}")
    if "b" in args.parts:
        target = args.target or 1.5
        b = part_b(args.model, target, max_steps=200, max_rounds=20,
                   local_steps=args.local_steps)
        print(f"(b) target eval loss {target}: sync {b['sync']['steps']} steps "
              f"{b['sync']['bytes'] / 1e6:.1f} MB (reached {b['sync']['reached']}); federated "
              f"{b['fed']['rounds']} rounds {b['fed']['bytes'] / 1e6:.1f} MB (reached "
              f"{b['fed']['reached']}); sync/federated bytes = {b['ratio']:.1f}x")
    if "c" in args.parts:
        c = part_c(args.model, args.rounds)
        print(f"(c) final eval: honest {c['honest']:.4f}; 1/4 adversarial trimmed_mean "
              f"{c['trimmed_mean']:.4f} ({c['trimmed_mean'] / c['honest']:.3f}x honest); "
              f"plain mean {c['mean']:.4f} ({c['mean'] / c['honest']:.3f}x honest)")
    print(f"total {time.monotonic() - t0:.0f}s")


if __name__ == "__main__":
    main()
