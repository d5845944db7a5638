"""What the Tinker front end costs per step over the native API.

One coordinator and one worker; the same batch is trained, step for step
alternately, on two runs: one driven by ``SignalClient`` (``/v1``, the
reference) and one by the unmodified ``tinker`` SDK (``/api/v1``: protobuf
bodies, futures polled with ``retrieve_future``, per-model seq_id ordering).
A step is one forward_backward + one optim_step, each waited for. Prints the
median seconds per step of each and their ratio (target <= 1.10).

    python bench/tinker_overhead.py [--model signal-tiny] [--batch 8] [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import tinker
import torch
from _cluster import Cluster
from tinker import types


def main() -> None:
    from rewardsignal.data import examples_to_datums, sample_examples
    from rewardsignal.models import load_tokenizer, resolve_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="signal-tiny")
    ap.add_argument("--batch", type=int, default=8, help="examples per step")
    ap.add_argument("--steps", type=int, default=12, help="measured steps (after 2 warm-up)")
    args = ap.parse_args()
    resolve_model_path(args.model)
    datums = examples_to_datums(sample_examples()[: args.batch], load_tokenizer(args.model))
    native_batch = [d.to_json() for d in datums]
    tinker_batch = [types.Datum(
        model_input=types.ModelInput.from_ints(list(d.input_ids)),
        loss_fn_inputs={"target_tokens": np.array(d.target_ids, dtype=np.int64),
                        "weights": np.array(d.weights, dtype=np.float32)}) for d in datums]
    adam = types.AdamParams(learning_rate=1e-3)
    native_s, tinker_s = [], []
    with Cluster(1) as cluster:
        run = cluster.client.create_run(base_model=args.model, lora_r=4, lora_alpha=32,
                                        learning_rate=1e-3)
        service = tinker.ServiceClient(base_url=cluster.url, api_key="tml-bench")
        training = service.create_lora_training_client(base_model=args.model, rank=4)
        for i in range(args.steps + 2):
            t0 = time.perf_counter()
            run.forward_backward(batch=native_batch, reduction="sum")
            run.optim_step(learning_rate=1e-3)
            t1 = time.perf_counter()
            training.forward_backward(tinker_batch, "cross_entropy").result()
            training.optim_step(adam).result()
            t2 = time.perf_counter()
            if i >= 2:
                native_s.append(t1 - t0)
                tinker_s.append(t2 - t1)
            print(f"step {i + 1}/{args.steps + 2}: native {t1 - t0:.3f} s, "
                  f"tinker {t2 - t1:.3f} s", flush=True)
    n, t = statistics.median(native_s), statistics.median(tinker_s)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}")
    print(f"model {args.model}, batch {args.batch} examples, {args.steps} measured steps")
    print(f"native /v1 (SignalClient):   {n:.3f} s/step")
    print(f"tinker /api/v1 (tinker SDK): {t:.3f} s/step")
    print(f"ratio tinker / native: {t / n:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
