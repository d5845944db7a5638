"""How far two honest workers' results differ, to set the agreement tolerance
of verification (``coordinator/trust/compare.py``).

Computes the same shard's summed-loss gradient, loss sum and logprobs at one
adapter version with different torch thread counts and micro-batch splits (what
differs between two honest CPU workers), in fp32 and in bf16, and prints the
largest relative L2 difference of each against the fp32 single-thread result.

    python bench/verify_tolerance.py [--model signal-small] [--batch 16]
"""

from __future__ import annotations

import argparse
import itertools
import platform

import torch

from rewardsignal.data import examples_to_datums
from rewardsignal.lora import LoraSpec, init_adapter
from rewardsignal.models import load_tokenizer, model_info
from rewardsignal.precision import Precision
from rewardsignal.worker.engine import Engine


def rel_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5
    den = max(sum(float(b[k].double().pow(2).sum()) for k in b) ** 0.5, 1e-30)
    return num / den


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="signal-small")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    batch = [{"input": f"Question {i}: what is {i} plus {i * 3}?",
              "output": f" It is {i + i * 3}, as {i} and {i * 3} make {i * 4}."}
             for i in range(args.batch)]
    datums = examples_to_datums(batch, tok)
    spec = LoraSpec(r=8, alpha=16.0, target_modules=model_info(args.model).default_target_modules,
                    seed=0)
    adapter = init_adapter(args.model, spec)
    # B is zero at version 0, which makes half the gradient trivially equal: perturb it.
    g = torch.Generator().manual_seed(1)
    adapter = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in adapter.items()}
    results = {}
    for dtype, threads, micro in itertools.product(("fp32", "bf16"), (1, 2), (64, 4096)):
        torch.set_num_threads(threads)
        eng = Engine("cpu")
        prec = Precision(base_dtype=dtype)
        model, key = eng.activate(args.model, spec, "r", 0, adapter, prec)
        res = eng.forward_backward(model, key, datums, "cross_entropy", {}, micro_tokens=micro)
        results[(dtype, threads, micro)] = res
    ref = results[("fp32", 1, 4096)]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}")
    print(f"model {args.model}, batch {args.batch}, {sum(len(d) for d in datums)} tokens")
    for k, res in results.items():
        lp = [x for row in res.logprobs for x in row]
        lp_ref = [x for row in ref.logprobs for x in row]
        lp_diff = max(abs(a - b) for a, b in zip(lp, lp_ref, strict=True))
        print(f"{k}: grad rel L2 {rel_l2(res.grads, ref.grads):.2e}  loss_sum rel "
              f"{abs(res.loss_sum - ref.loss_sum) / abs(ref.loss_sum):.2e}  max |dlogprob| "
              f"{lp_diff:.2e}")
    for dtype in ("fp32", "bf16"):
        same = [results[(dtype, t, m)] for t in (1, 2) for m in (64, 4096)]
        worst = max(rel_l2(a.grads, b.grads) for a in same for b in same)
        print(f"{dtype} vs {dtype}: worst grad rel L2 over threads x micro-batches {worst:.2e}")
    sample_vs_forward(args.model, spec, adapter, datums)


def sample_vs_forward(model_id: str, spec: LoraSpec, adapter: dict, datums: list) -> None:
    """A sample's claimed logprobs (KV-cached, batched generation) against a
    forward pass over the returned tokens: what a sample check compares."""
    from rewardsignal.worker.sampling import SampleParams

    prompts = [list(d.input_ids[:12]) for d in datums[:8]]
    for dtype, threads in (("fp32", 1), ("fp32", 2), ("bf16", 1)):
        torch.set_num_threads(threads)
        eng = Engine("cpu")
        prec = Precision(base_dtype=dtype)
        model, key = eng.activate(model_id, spec, "r", 0, adapter, prec)
        samples, _ = eng.sample(model, model_id, prompts, [[i] for i in range(len(prompts))],
                                SampleParams(max_tokens=24, temperature=1.0))
        torch.set_num_threads(1)
        ref_eng = Engine("cpu")
        ref_model, ref_key = ref_eng.activate(model_id, spec, "r", 0, adapter, Precision("fp32"))
        worst = 0.0
        for p, group in zip(prompts, samples, strict=True):
            toks = group[0]["tokens"]
            from rewardsignal.data.types import Datum

            d = Datum(tuple(p + toks[:-1]), tuple(p[1:] + toks),
                      tuple([0.0] * (len(p) - 1) + [1.0] * len(toks)))
            res = ref_eng.forward_backward(ref_model, ref_key, [d], "cross_entropy", {},
                                           backward=False)
            got = res.logprobs[0][-len(toks):]
            worst = max(worst, max(abs(a - b) for a, b in zip(got, group[0]["logprobs"],
                                                                strict=True)))
        print(f"sample ({dtype}, {threads} threads) vs fp32 forward: max |dlogprob| {worst:.2e}")


if __name__ == "__main__":
    main()
