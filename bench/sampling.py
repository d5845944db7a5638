"""Sampling throughput: Signal's fleet path against plain batched ``generate``.

One request of ``--prompts`` prompts x ``--num-samples`` samples x
``--max-tokens`` new tokens at temperature 1 (no stop, so every sequence runs
to ``max_tokens``), on the same model and adapter:

- reference: Hugging Face ``generate`` in this process, all sequences in one
  batch (left padding, KV cache);
- per-prompt: ``generate`` once per sequence, as the worker did before batched
  sampling (for the record of the speed-up);
- Signal: a coordinator and one worker (``--threads`` = this machine's cores),
  and a second coordinator with two workers of half the threads each.

The three are interleaved, round by round; medians over ``--repeats``.

Generated tokens per second, each a ratio against the reference measured in the
same run. Reported by hand in ``bench/RESULTS.md``.

    python bench/sampling.py [--model signal-small] [--prompts 32] [--num-samples 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _cluster import Cluster  # noqa: E402


def _prompts(n: int) -> list[str]:
    from rewardsignal.data import sample_examples

    texts = [e.get("text") or e.get("input") or "Hello" for e in sample_examples()]
    return [t[:40] for t in texts[:n]]


def _reference_model(cluster: Cluster, run, model_id: str, spec_json: dict):
    from peft import get_peft_model, set_peft_model_state_dict

    from rewardsignal.lora import LoraSpec, peft_config
    from rewardsignal.models import load_model
    from rewardsignal.protocol import tensors_from_bytes

    raw = cluster.client._loop.run(cluster.client._target._http(
        "GET", f"/v1/runs/{run.run_id}/weights/{spec_json['version']}", raw=True))
    spec = LoraSpec(r=spec_json["lora_r"], alpha=spec_json["lora_alpha"],
                    target_modules=tuple(spec_json["lora_target_modules"]),
                    seed=spec_json["seed"])
    model = get_peft_model(load_model(model_id), peft_config(spec))
    set_peft_model_state_dict(model, tensors_from_bytes(raw))
    return model.eval()


def _hf_generate(model, prompt_ids: list[list[int]], max_tokens: int) -> int:
    """Generated tokens, all sequences in one left-padded batch."""
    width = max(map(len, prompt_ids))
    ids = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=True, temperature=1.0,
                             top_k=0, pad_token_id=0)
    return (out.shape[1] - width) * len(prompt_ids)


def _timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def _signal_rate(run, prompts: list[str], args) -> float:
    def go() -> int:
        res = run.sample(prompts=prompts, num_samples=args.num_samples,
                         max_tokens=args.max_tokens, temperature=1.0, seed=1)
        return sum(len(s["tokens"]) for g in res["sequences"] for s in g)

    s, n = _timed(go)
    return n / s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="signal-small")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-prompt-sequences", type=int, default=16,
                    help="sequences timed on the per-prompt path (its rate per token)")
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    torch.set_num_threads(cores)
    prompts = _prompts(args.prompts)
    print(f"machine: {cores} cpus, torch {torch.__version__}; {args.model}, {args.prompts} "
          f"prompts x {args.num_samples} samples x {args.max_tokens} new tokens, temperature 1; "
          "reference and Signal runs interleaved", flush=True)
    # Both clusters stay up (idle workers only long-poll) so that their runs can be
    # interleaved with the reference's: whatever else loads the machine, loads all.
    one, two = Cluster(1, threads=cores), Cluster(2, threads=max(1, cores // 2))
    try:
        run_one = one.client.create_run(base_model=args.model, lora_r=8, learning_rate=1e-3)
        run_two = two.client.create_run(base_model=args.model, lora_r=8, learning_rate=1e-3)
        model = _reference_model(one, run_one, args.model, run_one.info())
        prompt_ids = run_one.sample(prompts=prompts, max_tokens=1)["prompt_tokens"]
        seqs = [p for p in prompt_ids for _ in range(args.num_samples)]
        _hf_generate(model, seqs[:4], 4)  # warm-ups: model loads, first calls
        run_two.sample(prompts=prompts[:2], max_tokens=2)
        rates: dict[str, list[float]] = {"ref": [], "one": [], "two": []}
        for i in range(args.repeats):
            s, n = _timed(lambda: _hf_generate(model, seqs, args.max_tokens))
            rates["ref"].append(n / s)
            rates["one"].append(_signal_rate(run_one, prompts, args))
            rates["two"].append(_signal_rate(run_two, prompts, args))
            print(f"  .. round {i + 1}/{args.repeats}: reference {rates['ref'][-1]:,.0f}, "
                  f"1 worker {rates['one'][-1]:,.0f}, 2 workers {rates['two'][-1]:,.0f} tok/s",
                  flush=True)
        s, n = _timed(lambda: sum(_hf_generate(model, [q], args.max_tokens)
                                  for q in seqs[:args.per_prompt_sequences]))
        per_prompt = n / s
    finally:
        one.close()
        two.close()
    ref, r1, r2 = (statistics.median(rates[k]) for k in ("ref", "one", "two"))
    print(f"reference (in-process batched generate): {ref:,.0f} tok/s")
    print(f"per-prompt generate (the old worker path): {per_prompt:,.0f} tok/s, "
          f"ratio {per_prompt / ref:.3f}")
    print(f"signal, coordinator + 1 worker ({cores} threads): {r1:,.0f} tok/s, "
          f"ratio {r1 / ref:.3f} (target >= 0.8)")
    print(f"signal, 2 workers x {max(1, cores // 2)} threads: {r2:,.0f} tok/s, "
          f"ratio {r2 / ref:.3f}")


if __name__ == "__main__":
    main()
