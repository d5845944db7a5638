"""Learning-rate warm-up and cosine decay, in your own loop (as in Tinker).

``optim_step`` takes its AdamW hyper-parameters per call (``learning_rate``,
``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``grad_clip_norm``), so a
schedule is a function of the step that you call before each step: nothing is
configured on the coordinator, and you can change it while a run is going.

    signal-coordinator &  signal-worker --coordinator http://127.0.0.1:8000 &
    python examples/lr_schedule.py --steps 20 --warmup 4
"""

from __future__ import annotations

import argparse
import math
import os

from rewardsignal import SignalClient
from rewardsignal.data import sample_examples


def cosine_with_warmup(step: int, *, peak: float, warmup: int, total: int,
                       floor: float = 0.0) -> float:
    """Linear warm-up from peak/warmup to ``peak`` over ``warmup`` steps, then a
    half cosine down to ``floor`` at step ``total - 1``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coordinator", default=os.environ.get("SIGNAL_URL",
                                                           "http://127.0.0.1:8000"))
    p.add_argument("--model", default="signal-tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--peak-lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    examples = sample_examples()
    with SignalClient(base_url=args.coordinator) as client:
        run = client.create_run(base_model=args.model, lora_r=8, learning_rate=args.peak_lr)
        for step in range(args.steps):
            lr = cosine_with_warmup(step, peak=args.peak_lr, warmup=args.warmup,
                                    total=args.steps)
            start = (step * args.batch_size) % len(examples)
            batch = examples[start:start + args.batch_size]
            loss = run.forward_backward(batch)["loss"]
            out = run.optim_step(learning_rate=lr, weight_decay=0.01, grad_clip_norm=1.0)
            print(f"step {step:3d}  lr {out['learning_rate']:.6f}  loss {loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
