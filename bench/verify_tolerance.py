"""How far two honest workers' results differ, to set the agreement tolerance
of verification (``coordinator/trust/compare.py``).

Computes the same shard's summed-loss gradient, loss sum and logprobs at one
adapter version with different torch thread counts and micro-batch splits (what
differs between two honest CPU workers), in fp32 and in bf16, and prints the
largest relative L2 difference of each against the fp32 single-thread result.
``--parts train`` does the same for a federated ``train`` task's delta (same
shard, same seed, K local AdamW steps), with the error each codec adds and what
the cheap cheats differ by (sign flip, 5x, another shard, half the steps).

    python bench/verify_tolerance.py [--model signal-small] [--batch 16]
                                     [--parts grad,sample,train] [--local-steps 8 32]
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
    ap.add_argument("--parts", default="grad,sample,train",
                    help="comma-separated: grad (forward_backward), sample, train")
    ap.add_argument("--local-steps", type=int, nargs="+", default=[8, 32],
                    help="K of the train part")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
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
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}")
    if "grad" in parts:
        gradients(args.model, spec, adapter, datums)
    if "sample" in parts:
        sample_vs_forward(args.model, spec, adapter, datums)
    if "train" in parts:
        for k in args.local_steps:
            train_deltas(args.model, spec, adapter, tok, k)


def gradients(model_id: str, spec: LoraSpec, adapter: dict, datums: list) -> None:
    results = {}
    for dtype, threads, micro in itertools.product(("fp32", "bf16"), (1, 2), (64, 4096)):
        torch.set_num_threads(threads)
        eng = Engine("cpu")
        prec = Precision(base_dtype=dtype)
        model, key = eng.activate(model_id, spec, "r", 0, adapter, prec)
        res = eng.forward_backward(model, key, datums, "cross_entropy", {}, micro_tokens=micro)
        results[(dtype, threads, micro)] = res
    ref = results[("fp32", 1, 4096)]
    print(f"model {model_id}, batch {len(datums)}, {sum(len(d) for d in datums)} tokens")
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


def sample_vs_forward(model_id: str, spec: LoraSpec, adapter: dict, datums: list) -> None:
    """A sample's claimed logprobs (KV-cached, batched generation) against a
    forward pass over the returned tokens: what a sample check compares."""
    from rewardsignal.worker.sampling import SampleParams

    prompts = [list(d.input_ids[:12]) for d in datums[:8]]
    for dtype, threads, temp in (("fp32", 1, 1.0), ("fp32", 2, 1.0), ("bf16", 1, 1.0),
                                 ("fp32", 2, 0.7), ("bf16", 1, 0.7)):
        torch.set_num_threads(threads)
        eng = Engine("cpu")
        prec = Precision(base_dtype=dtype)
        model, key = eng.activate(model_id, spec, "r", 0, adapter, prec)
        samples, _ = eng.sample(model, model_id, prompts, [[i] for i in range(len(prompts))],
                                SampleParams(max_tokens=24, temperature=temp))
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
                                           backward=False, temperature=temp)
            got = res.logprobs[0][-len(toks):]
            worst = max(worst, max(abs(a - b) for a, b in zip(got, group[0]["logprobs"],
                                                                strict=True)))
        print(f"sample ({dtype}, {threads} threads, temperature {temp}) vs fp32 forward at "
              f"that temperature: max |dlogprob| {worst:.2e}")


def train_deltas(model_id: str, spec: LoraSpec, adapter: dict, tok, steps: int) -> None:
    """A ``train`` task's delta (``steps`` local AdamW steps of batch 8 over a
    64-example shard, seeded order, as ``federated.rounds`` issues them) under
    what differs between honest workers, the codecs' error on it, and cheats."""
    from rewardsignal.aggregation.agreement import relative_l2
    from rewardsignal.aggregation.codecs import decode, encode
    from rewardsignal.data import sample_examples

    shards = [examples_to_datums(sample_examples()[i: i + 64], tok) for i in (0, 64)]

    def delta(dtype: str, threads: int, micro: int, shard: int = 0, k: int = steps) -> dict:
        torch.set_num_threads(threads)
        eng = Engine("cpu")
        model, key = eng.activate(model_id, spec, "r", 0, adapter, Precision(base_dtype=dtype))
        d, _ = eng.train_local(model, key, model_id, shards[shard], steps=k, batch_size=8,
                               learning_rate=2e-3, seed=7, micro_tokens=micro)
        return d

    runs = {(dt, t, m): delta(dt, t, m)
            for dt, t, m in itertools.product(("fp32", "bf16"), (1, 2), (64, 4096))}
    ref = runs[("fp32", 1, 4096)]
    # Relative to the larger of the two, as ``aggregation.agreement`` compares.
    print(f"train task: K={steps} local AdamW steps (lr 2e-3, batch 8, 64-example shard)")
    for dtype in ("fp32", "bf16"):
        same = [runs[(dtype, t, m)] for t in (1, 2) for m in (64, 4096)]
        worst = max(relative_l2(a, b) for a in same for b in same)
        print(f"  {dtype} vs {dtype}, threads x micro-batches: worst delta rel L2 {worst:.2e}")
    worst = max(relative_l2(runs[("bf16", t, m)], ref) for t in (1, 2) for m in (64, 4096))
    print(f"  bf16 base vs fp32: worst delta rel L2 {worst:.2e}")
    for codec in ("fp16", "bf16", "int8"):
        print(f"  codec {codec}: delta rel L2 to fp32 {relative_l2(decode(encode(ref, codec), codec), ref):.2e}")
    cheats = {"sign flip": {k: -v for k, v in ref.items()},
              "5x": {k: 5 * v for k, v in ref.items()},
              "another shard": delta("fp32", 1, 4096, shard=1),
              "half the steps": delta("fp32", 1, 4096, k=max(steps // 2, 1))}
    for name, d in cheats.items():
        print(f"  cheat {name}: rel L2 to honest {relative_l2(d, ref):.2e}")


if __name__ == "__main__":
    main()
