"""Training and sampling speed of a GPU worker against plain PEFT on the same GPU.

Measures, in one run on one CUDA machine, back to back (each side has the GPU
to itself: the reference is freed before the worker computes):
  reference   plain PEFT + torch.optim.AdamW in this process: bf16 base, fp32
              LoRA, the whole batch per step with gradient accumulation over the
              same micro-batches the worker uses;
  signal      the same steps through a coordinator on 127.0.0.1 and one worker
              process with --device cuda (one forward_backward + one optim_step
              per step: shipping the batch and logprobs, the weights of each new
              version, the gradient, AdamW on the coordinator, a durable
              checkpoint).
Prints tokens/s of each and their ratio (target >= 0.9), peak GPU memory of
each (torch.cuda.max_memory_allocated: in this process for the reference, in
the worker process for Signal, which prints it when it exits), and sampling
tokens/s (the worker's sample task vs model.generate here, same prompts).
Without CUDA it says so and exits 0 (--device cpu runs it anyway, to debug
the script with a tiny model; its figures mean nothing).

    python bench/gpu_worker.py [--model signal-1b] [--batch 128] [--seq-len 1024]
                               [--quantization nf4] [--base-dtype bf16] [--sampler vllm]

``--quantization nf4`` (needs bitsandbytes) loads the frozen base as QLoRA does
on both sides: the reference through the same ``load_model``, Signal as a run
created with ``quantization="nf4"``.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import tempfile
import time

import _as_worker  # noqa: F401  (first: the reference runs as a worker process does)
import torch
from _breakdown import Breakdown
from _cluster import Cluster


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def make_batch(model_id: str, n: int, seq_len: int) -> list[dict]:
    """``n`` windows of ``seq_len`` tokens cut from the shipped chat examples (a
    learnable byte stream), as Tinker-style datums so no chat template applies."""
    from rewardsignal.data import sample_examples
    from rewardsignal.models import load_tokenizer

    tok = load_tokenizer(model_id)
    text = "\n".join(m["content"] for ex in sample_examples() for m in ex["messages"])
    stream = tok.encode(text, add_special_tokens=False)
    while len(stream) < n * 64 + seq_len + 1:
        stream = stream + stream
    out = []
    for i in range(n):
        w = stream[i * 64: i * 64 + seq_len + 1]
        out.append({"model_input": w[:-1], "loss_fn_inputs": {"target_tokens": w[1:]}})
    return out


class Reference:
    """Plain PEFT + torch.optim.AdamW on one device: bf16 base, fp32 LoRA."""

    def __init__(self, model_id: str, batch: list[dict], r: int, lr: float, device: str,
                 micro_tokens: int, base_dtype: str = "auto",
                 quantization: str | None = None) -> None:
        from peft import get_peft_model

        from rewardsignal.lora import LoraSpec, peft_config
        from rewardsignal.models import load_model, model_info
        from rewardsignal.precision import TORCH_NAMES
        from rewardsignal.worker.engine import default_dtype

        self.device = torch.device(device)
        spec = LoraSpec(r=r, alpha=2.0 * r,
                        target_modules=model_info(model_id).default_target_modules)
        dtype = (default_dtype(self.device) if base_dtype == "auto"
                 else getattr(torch, TORCH_NAMES[base_dtype]))
        base = load_model(model_id, dtype=dtype, device=device, quantization=quantization)
        self.model = get_peft_model(base, peft_config(spec))
        params = [p for p in self.model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in params), "LoRA must be fp32"
        self.opt = torch.optim.AdamW(params, lr=lr)
        ids = torch.tensor([d["model_input"] for d in batch])
        tgt = torch.tensor([d["loss_fn_inputs"]["target_tokens"] for d in batch])
        per = max(1, micro_tokens // ids.shape[1])  # rows per micro-batch, as the worker splits
        self.chunks = [(ids[i:i + per].to(device), tgt[i:i + per].to(device))
                       for i in range(0, len(ids), per)]
        self.tokens = ids.numel()

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        for ids, tgt in self.chunks:
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt.unsqueeze(-1))
            (-lp.sum() / self.tokens).backward()
        self.opt.step()
        _sync(self.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        n = 0
        for p in prompts:
            ids = torch.tensor([p], device=self.device)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=0)
            n += out.shape[1] - ids.shape[1]
        _sync(self.device)
        return n, time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_reference(args, batch, prompts) -> dict:
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ref = Reference(args.model, batch, args.lora_r, args.lr, args.device,
                    args.micro_batch_tokens, args.base_dtype, args.quantization)
    times = []
    for i in range(args.warmup + args.steps):
        times.append(ref.step())
        progress(f"reference step {i + 1}/{args.warmup + args.steps}: {times[-1]:.3f} s "
                 f"({ref.tokens / times[-1]:,.0f} tok/s)")
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    ref.sample(prompts[:1], 8)  # warm-up of the generation path
    n, dt = ref.sample(prompts, args.sample_tokens)
    progress(f"reference sampling: {n} tokens in {dt:.2f} s")
    out = {"times": times[args.warmup:], "tokens": ref.tokens, "peak": peak,
           "sample_tokens": n, "sample_s": dt}
    del ref
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the worker gets the whole GPU
    return out


def run_signal(args, batch, prompts) -> dict:
    tokens = sum(len(d["model_input"]) for d in batch)
    log = os.path.join(tempfile.mkdtemp(prefix="signal-gpu-bench-"), "worker.log")
    worker_args = ("--max-tokens-per-task", str(tokens),
                   "--micro-batch-tokens", str(args.micro_batch_tokens), "--sampler", args.sampler)
    times = []
    with Cluster(1, device=args.device, worker_args=worker_args, worker_log=log) as cluster:
        run = cluster.client.create_run(base_model=args.model, lora_r=args.lora_r,
                                        learning_rate=args.lr, max_length=args.seq_len,
                                        base_dtype=args.base_dtype,
                                        quantization=args.quantization)
        fb_times, opt_times = [], []
        stages = Breakdown(cluster)
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                stages.start()
            t0 = time.perf_counter()
            fb = run.forward_backward(batch=batch)
            t1 = time.perf_counter()
            run.optim_step()
            times.append(time.perf_counter() - t0)
            fb_times.append(t1 - t0)
            opt_times.append(times[-1] - fb_times[-1])
            stages.sdk("forward_backward call", fb_times[-1])
            stages.sdk("optim_step call", opt_times[-1])
            progress(f"signal step {i + 1}/{args.warmup + args.steps}: {times[-1]:.3f} s "
                     f"({tokens / times[-1]:,.0f} tok/s, loss {fb['loss']:.4f})")
        stages.stop(args.steps)
        run.sample(prompt_tokens=prompts[:1], max_tokens=8, temperature=0)
        t0 = time.perf_counter()
        s = run.sample(prompt_tokens=prompts, max_tokens=args.sample_tokens, temperature=0)
        sample_s = time.perf_counter() - t0
        n = sum(len(t) for t in s["tokens"])
        progress(f"signal sampling: {n} tokens in {sample_s:.2f} s")
    text = open(log).read()
    m = re.search(r"peak GPU memory allocated [\d.]+ GiB \((\d+) bytes\)", text)
    return {"times": times[args.warmup:], "fb_times": fb_times[args.warmup:],
            "opt_times": opt_times[args.warmup:], "tokens": tokens, "peak": int(m.group(1)) if m else None,
            "sample_tokens": n, "sample_s": sample_s, "log": log, "stages": stages}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="signal-1b")
    ap.add_argument("--batch", type=int, default=128, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=5, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384,
                    help="tokens per forward pass on both sides (the worker's GPU default)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--sample-prompts", type=int, default=8)
    ap.add_argument("--sample-tokens", type=int, default=128)
    ap.add_argument("--sampler", default="builtin", choices=["builtin", "vllm"],
                    help="what the worker samples with (vllm: pip install 'rewardsignal[vllm]')")
    ap.add_argument("--base-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="the frozen base's dtype on both sides (auto: bf16 on GPUs)")
    ap.add_argument("--quantization", default=None, choices=["nf4", "int8"],
                    help="load the base quantized with bitsandbytes on both sides (QLoRA)")
    ap.add_argument("--device", default="cuda",
                    help="cuda (default); cpu only to debug this script with a tiny model")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu_worker.py: skipped, CUDA is not available on this machine "
              "(run it on a GPU box with a CUDA build of torch; --device cpu debugs it)")
        return 0
    from rewardsignal.models import fingerprint, resolve_model_path

    t0 = time.perf_counter()
    resolve_model_path(args.model)
    progress(f"{args.model} ready in {time.perf_counter() - t0:.1f} s "
             f"({fingerprint(args.model)[:19]})")
    batch = make_batch(args.model, args.batch, args.seq_len)
    prompts = [d["model_input"][:32] for d in batch[: args.sample_prompts]]
    ref = run_reference(args, batch, prompts)
    sig = run_signal(args, batch, prompts)

    ref_tps = ref["tokens"] / statistics.median(ref["times"])
    sig_tps = sig["tokens"] / statistics.median(sig["times"])
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(args.device))
        print(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"device: cpu (debug run: figures mean nothing), torch {torch.__version__}")
    print(f"base precision {args.base_dtype}" + (f"+{args.quantization}" if args.quantization
                                                  else "") + "; ", end="")
    print(f"model {args.model}, batch {args.batch} x {args.seq_len} = {ref['tokens']} tokens "
          f"per step, micro-batches of {args.micro_batch_tokens} tokens, lora_r {args.lora_r}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"reference (in-process PEFT + AdamW): {ref_tps:,.0f} tok/s  "
          f"{[round(t, 3) for t in ref['times']]} s/step")
    print(f"signal (coordinator + 1 worker):     {sig_tps:,.0f} tok/s  "
          f"{[round(t, 3) for t in sig['times']]} s/step")
    print(f"ratio signal / reference tokens/s: {sig_tps / ref_tps:.3f}  (target >= 0.9)")
    fb_s, opt_s = statistics.median(sig["fb_times"]), statistics.median(sig["opt_times"])
    print(f"signal step split (medians): forward_backward {fb_s:.3f} s (reference whole step "
          f"{statistics.median(ref['times']):.3f} s), optim_step {opt_s:.3f} s")

    def gib(b):
        return "n/a" if b is None else f"{b / 2**30:.2f} GiB"

    print(f"peak GPU memory allocated (torch.cuda.max_memory_allocated): reference "
          f"{gib(ref['peak'])}, signal worker {gib(sig['peak'])}")
    from rewardsignal.memory import estimate_train_memory_bytes

    dtype = "bf16" if args.base_dtype == "auto" else args.base_dtype
    est = estimate_train_memory_bytes(args.model, dtype=dtype, quantization=args.quantization,
                                      lora_r=args.lora_r, tokens=args.micro_batch_tokens)
    print(f"placement's estimate for one {args.micro_batch_tokens}-token micro-batch: "
          f"{gib(est)} (vs the measured peaks above)")
    r_sps = ref["sample_tokens"] / ref["sample_s"]
    s_sps = sig["sample_tokens"] / sig["sample_s"]
    print(f"sampling, {args.sample_prompts} prompts x up to {args.sample_tokens} new tokens, "
          f"greedy: reference model.generate {r_sps:,.0f} tok/s ({ref['sample_tokens']} tokens), "
          f"signal sample task ({args.sampler}) {s_sps:,.0f} tok/s "
          f"({sig['sample_tokens']} tokens), "
          f"ratio {s_sps / r_sps:.3f}")
    # Where the time beyond the worker's compute goes, and each process's CPU
    # (the per-token cost of the batch and its logprobs on the wire shows here).
    sig["stages"].report(statistics.median(ref["times"]))
    print(f"worker log: {sig['log']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
