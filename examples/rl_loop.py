"""Reinforcement learning on Signal in one page: GRPO-style groups, a verifiable
reward, the ``importance_sampling`` loss.

The toy task: after the prompt, write the letter ``a`` as often as you can. The
reward of a completion is the share of its characters that are ``a`` (it needs
no model to check). Each step samples ``group_size`` completions per prompt at
temperature 1, scores them, gives each token its completion's advantage (reward
minus the group's mean), and trains on them with ``importance_sampling``, whose
ratio uses the logprobs ``sample`` returned (at temperature 1 they are the
model's own, so the first step's ratio is exactly 1). The printed mean reward
rises as the adapter learns.

    signal-coordinator &  signal-worker --coordinator http://127.0.0.1:8000 &
    python examples/rl_loop.py --coordinator http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import statistics

from rewardsignal import SignalClient

PROMPTS = ["Say a:", "Only a:", "Letter a:", "Write a:"]


def reward(text: str) -> float:
    return text.count("a") / max(len(text), 1)


def rl_datums(prompt: list[int], samples: list[dict], rewards: list[float]) -> list[dict]:
    """One datum per completion: the whole sequence, loss on the completion only,
    each completion token weighted by its group-relative advantage."""
    mean = statistics.fmean(rewards)
    out = []
    for s, r in zip(samples, rewards, strict=True):
        if not s["tokens"]:
            continue
        tokens = prompt + s["tokens"]
        n_prompt = len(prompt) - 1  # targets that are still prompt tokens
        out.append({"model_input": tokens[:-1], "loss_fn_inputs": {
            "target_tokens": tokens[1:],
            "weights": [0.0] * n_prompt + [1.0] * len(s["tokens"]),
            "logprobs": [0.0] * n_prompt + s["logprobs"],
            "advantages": [0.0] * n_prompt + [r - mean] * len(s["tokens"])}})
    return out


def train(client: SignalClient, *, steps: int, group_size: int = 8, max_tokens: int = 8,
          learning_rate: float = 2e-2, base_model: str = "signal-tiny", seed: int = 0,
          log=print) -> list[float]:
    """Run the loop; the mean reward of each step's samples."""
    run = client.create_run(base_model=base_model, lora_r=8, learning_rate=learning_rate,
                            seed=seed)
    curve = []
    for step in range(steps):
        res = run.sample(prompts=PROMPTS, num_samples=group_size, max_tokens=max_tokens,
                         temperature=1.0, seed=seed * 1000 + step)
        batch, rewards = [], []
        for prompt_ids, samples in zip(res["prompt_tokens"], res["sequences"], strict=True):
            rs = [reward(s["text"]) for s in samples]
            rewards += rs
            batch += rl_datums(prompt_ids, samples, rs)
        curve.append(statistics.fmean(rewards))
        log(f"step {step + 1:3d}/{steps}  mean reward {curve[-1]:.3f}")
        if batch:
            run.forward_backward(batch, loss_fn="importance_sampling", reduction="sum")
            run.optim_step()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--coordinator", default="http://127.0.0.1:8000")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--group-size", type=int, default=8)
    args = ap.parse_args()
    with SignalClient(base_url=args.coordinator) as client:
        curve = train(client, steps=args.steps, group_size=args.group_size)
    print(f"mean reward: first 3 steps {statistics.fmean(curve[:3]):.3f}, "
          f"last 3 steps {statistics.fmean(curve[-3:]):.3f}")


if __name__ == "__main__":
    main()
