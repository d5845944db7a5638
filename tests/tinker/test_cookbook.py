"""Two tinker-cookbook recipes, unmodified, run to completion against Signal:
the chat supervised recipe (a local JSONL, the role_colon renderer) and the
math RL recipe on its arithmetic environment (needs no download), on a local
model directory (the built-in signal-tiny's)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from harness import start_coordinator, start_worker, wait_workers

from rewardsignal.models import resolve_model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    coord, url = start_coordinator(tmp_path_factory.mktemp("data"))
    worker = start_worker(url, "w0")
    wait_workers(url, 1)
    yield url
    worker.stop()
    coord.stop()


def _recipe(url: str, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINKER_API_KEY": "tml-test", "TINKER_TELEMETRY": "0"}
    res = subprocess.run([sys.executable, "-m", module, f"base_url={url}",
                          f"model_name={resolve_model_path('signal-tiny')}",
                          "renderer_name=role_colon", "lora_rank=4",
                          "behavior_if_log_dir_exists=delete", *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _metrics(log_path) -> list[dict]:
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def test_chat_supervised_recipe_trains_and_its_loss_falls(cluster, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n"
        for i in range(40)))
    _recipe(cluster, "tinker_cookbook.recipes.chat_sl.train", f"dataset={data}",
            "batch_size=8", "max_steps=4", "learning_rate=1e-3", "save_every=2",
            "eval_every=0", "infrequent_eval_every=0", f"log_path={tmp_path / 'sl'}")
    losses = [m["train_mean_nll"] for m in _metrics(tmp_path / "sl") if "train_mean_nll" in m]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.2, losses


def test_math_rl_recipe_samples_rewards_and_trains(cluster, tmp_path):
    _recipe(cluster, "tinker_cookbook.recipes.math_rl.train", "env=arithmetic",
            "group_size=4", "groups_per_batch=4", "max_steps=3", "max_tokens=5",
            "learning_rate=1e-3", "loss_fn=importance_sampling", "eval_every=0",
            "save_every=0", f"log_path={tmp_path / 'rl'}")
    steps = [m for m in _metrics(tmp_path / "rl") if "env/all/reward/total" in m]
    assert len(steps) == 3
    assert all(math.isfinite(m["env/all/reward/total"]) for m in steps)
    # groups x group size x max_tokens at most (a sample may stop early), all trained on
    assert all(0 < m["tokens/sampled"] <= 4 * 4 * 5 for m in steps)
    assert all(m["tokens/trained"] > m["tokens/sampled"] for m in steps)
