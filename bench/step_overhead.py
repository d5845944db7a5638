"""Per-step overhead of training through the coordinator.

Measures, in one run on this machine:
  reference   plain PEFT + torch.optim.AdamW in this process, whole batch per step;
  signal      the same steps through a coordinator and one worker process over
              loopback (one forward_backward + one optim_step per step, which
              includes shipping the batch, the weights of each new version, the
              gradient, AdamW on the coordinator and a durable checkpoint).
Prints the median seconds per step of each and their ratio (targets: 1.3 for
signal-tiny, 1.05 for signal-small). Each side runs its steps back to back in
blocks of ``--block`` (the sides take turns), so background work a Signal step
leaves behind slows the next Signal step, as it would in a training loop, and
not the reference.

    python bench/step_overhead.py [--model signal-small] [--batch 48] [--steps 10]
                                  [--block 5] [--delay-ms 50] [--sdk-delay-ms 50]
                                  [--pipelined]
                                  [--tokenized] [--timeline]

``--data-dir-on /dev/shm``: the coordinator's data directory on a RAM file
system, where fsync costs nothing: the difference from a run on disk is what
this disk's fsync latency adds to a step (the request, the gradient file).

``--timeline``: every process marks where a step is (``rewardsignal.tracing``)
and the run ends with a step as a timeline: each mark at its median time after
the step began, and the CPU its thread spent to get there.

``--tokenized``: the SDK sends the batch as token ids (datums), tokenized once
before the steps as the reference's batch is; without it the coordinator
tokenizes the examples on every step.

Also prints where a step's time goes (from the coordinator's own metrics, per
measured step) and the worker's HTTP round trips per step.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import _as_worker  # noqa: F401  (first: the reference runs as a worker process does)
import torch
from _breakdown import Breakdown
from _cluster import Cluster

from rewardsignal import tracing


class Reference:
    """Plain PEFT + torch.optim.AdamW, whole batch per step, in this process."""

    def __init__(self, model_id: str, batch: list, r: int, lr: float) -> None:
        from peft import get_peft_model

        from rewardsignal.data import examples_to_datums
        from rewardsignal.lora import LoraSpec, peft_config
        from rewardsignal.models import load_model, load_tokenizer, model_info

        tok = load_tokenizer(model_id)
        datums = examples_to_datums(batch, tok)
        spec = LoraSpec(r=r, alpha=2.0 * r,
                        target_modules=model_info(model_id).default_target_modules)
        self.model = get_peft_model(load_model(model_id), peft_config(spec))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=lr)
        width = max(len(d) for d in datums)
        self.ids = torch.zeros(len(datums), width, dtype=torch.long)
        self.tgt = torch.zeros(len(datums), width, dtype=torch.long)
        self.mask = torch.zeros(len(datums), width, dtype=torch.long)
        self.w = torch.zeros(len(datums), width)
        for i, d in enumerate(datums):
            self.ids[i, : len(d)] = torch.tensor(d.input_ids)
            self.tgt[i, : len(d)] = torch.tensor(d.target_ids)
            self.mask[i, : len(d)] = 1
            self.w[i, : len(d)] = torch.tensor(d.weights)

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad()
        logits = self.model(input_ids=self.ids, attention_mask=self.mask).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, self.tgt.unsqueeze(-1)).squeeze(-1)
        loss = -(lp * self.w).sum() / self.w.sum()
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def measure(model_id: str, batch: list, steps: int, warmup: int, r: int, lr: float, *,
            block: int = 5, delay_s: float = 0.0, sdk_delay_s: float = 0.0,
            pipelined: bool = False,
            tokenized: bool = False, data_parent: str | None = None
            ) -> tuple[list[float], list[float], Breakdown]:
    """``steps`` timed steps of each side, in blocks of ``block`` reference steps
    and ``block`` Signal steps in turn: both see the same machine conditions over
    the run, and each side's steps run back to back, as a training loop runs
    them, so what a Signal step leaves running in the background (its checkpoint
    being written, the next version's delta) lands on the next Signal step, not
    on the reference. The first step of each block is run but not timed (it may
    pay for the other side's leftovers). ``delay_s``: the worker talks to the
    coordinator through a proxy adding this much each way; ``sdk_delay_s``: the
    SDK does."""
    ref = Reference(model_id, batch, r, lr)
    if tokenized:
        from rewardsignal.data import examples_to_datums
        from rewardsignal.models import load_tokenizer

        batch = [d.to_json() for d in examples_to_datums(batch, load_tokenizer(model_id))]
    with Cluster(1, worker_args=("--max-tokens-per-task", "1000000",
                                 "--micro-batch-tokens", "1000000"),
                 worker_delay_s=delay_s, client_delay_s=sdk_delay_s,
                 data_parent=data_parent) as cluster:
        run = cluster.client.create_run(base_model=model_id, lora_r=r, learning_rate=lr)
        stages = Breakdown(cluster)

        def signal_step(record: bool) -> float:
            if record:
                tracing.mark("bench: step begins")
            t0 = time.perf_counter()
            if pipelined:
                run.forward_backward_optim_step(batch=batch)
            else:
                run.forward_backward(batch=batch)
                t_fb = time.perf_counter()
                run.optim_step()
                if record:
                    stages.sdk("forward_backward call", t_fb - t0)
                    stages.sdk("optim_step call", time.perf_counter() - t_fb)
            return time.perf_counter() - t0

        for _ in range(warmup):
            ref.step()
            signal_step(False)
        ref_times: list[float] = []
        sig_times: list[float] = []
        run_steps = 0
        stages.start()
        while len(sig_times) < steps:
            n = min(block, steps - len(sig_times))
            ref.step()
            ref_times += [ref.step() for _ in range(n)]
            signal_step(True)
            sig_times += [signal_step(True) for _ in range(n)]
            run_steps += n + 1
        stages.stop(run_steps)
    return ref_times, sig_times, stages


def main() -> None:
    from rewardsignal.data import sample_examples
    from rewardsignal.models import resolve_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="signal-small")
    ap.add_argument("--batch", type=int, default=48, help="examples per step")
    ap.add_argument("--steps", type=int, default=10, help="measured steps (after 2 warm-up)")
    ap.add_argument("--block", type=int, default=5,
                    help="steps of one side run back to back before the other side's")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="one-way delay added between the worker and the coordinator "
                         "(an asyncio TCP proxy on 127.0.0.1)")
    ap.add_argument("--sdk-delay-ms", type=float, default=0.0,
                    help="one-way delay added between the SDK and the coordinator (a user "
                         "far from the fleet's coordinator)")
    ap.add_argument("--data-dir-on", default=None, metavar="DIR",
                    help="put the coordinator's data directory under DIR (e.g. /dev/shm)")
    ap.add_argument("--tokenized", action="store_true",
                    help="send token ids (tokenized once, as the reference's batch is)")
    ap.add_argument("--pipelined", action="store_true",
                    help="send forward_backward and optim_step as one pipelined SDK call")
    ap.add_argument("--timeline", action="store_true",
                    help="trace every process and print a step's timeline")
    args = ap.parse_args()
    trace_dir = tempfile.mkdtemp(prefix="signal-trace-") if args.timeline else None
    if trace_dir:
        tracing.start(trace_dir)  # before the cluster: its processes inherit it
    resolve_model_path(args.model)
    batch = sample_examples()[: args.batch]
    lr = 1e-3
    ref, sig, stages = measure(args.model, batch, args.steps, 2, args.lora_r, lr,
                               block=args.block, delay_s=args.delay_ms / 1000,
                               sdk_delay_s=args.sdk_delay_ms / 1000,
                               pipelined=args.pipelined, tokenized=args.tokenized,
                               data_parent=args.data_dir_on)
    ref_s, sig_s = statistics.median(ref), statistics.median(sig)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model {args.model}, batch {args.batch} examples"
          f"{' (token ids)' if args.tokenized else ''}, lora_r {args.lora_r}, "
          f"{args.steps} measured steps")
    print(f"reference (in-process PEFT + AdamW): {ref_s:.3f} s/step  {[round(t, 3) for t in ref]}")
    print(f"signal (coordinator + 1 worker):     {sig_s:.3f} s/step  {[round(t, 3) for t in sig]}")
    print(f"ratio signal / reference: {sig_s / ref_s:.3f}  (target <= 1.3 for signal-tiny, "
          "<= 1.05 for signal-small)")
    # On a shared machine other jobs inflate some steps of either side; the
    # fastest step of each is the least disturbed view of the fixed cost.
    print(f"fastest steps: reference {min(ref):.3f} s, signal {min(sig):.3f} s, "
          f"ratio {min(sig) / min(ref):.3f}")
    if args.data_dir_on:
        print(f"coordinator data directory under {args.data_dir_on}")
    if args.delay_ms:
        print(f"worker <-> coordinator through a proxy adding {args.delay_ms:g} ms each way")
    if args.sdk_delay_ms:
        print(f"SDK <-> coordinator through a proxy adding {args.sdk_delay_ms:g} ms each way")
    stages.report(ref_s, sig)
    if trace_dir:
        from _timeline import report

        tracing.flush()
        report(trace_dir)
        shutil.rmtree(trace_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
