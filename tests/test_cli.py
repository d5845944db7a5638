"""The command line as a user meets it: wrong flags, refused exposure, the demo."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest


def _cli(*args: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "rewardsignal.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_non_loopback_without_keys_is_refused(tmp_path):
    res = _cli("coordinator", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path))
    assert res.returncode == 2
    assert "refusing to listen on 0.0.0.0 without --api-key and --worker-token" in res.stderr
    res = _cli("coordinator", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path),
               "--api-key", "sk-1")
    assert res.returncode == 2 and "without --worker-token" in res.stderr
    res = _cli("coordinator", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path),
               "--api-key", "sk-1", "--worker-token", "wt-1")
    assert res.returncode == 2 and "without --models FILE" in res.stderr
    res = _cli("coordinator", "--models", str(tmp_path / "none.yaml"), "--port", "0",
               "--data-dir", str(tmp_path))
    assert res.returncode == 2 and "none.yaml" in res.stderr
    assert not (tmp_path / "runs").exists()  # refused before touching anything


@pytest.mark.parametrize("args, message", [
    (["coordinator", "--port", "99999"], "port must be <= 65535"),
    (["coordinator", "--delta-norm-max", "-1"], "must be > 0"),
    (["coordinator", "--max-staleness", "x"], "is not an integer"),
    (["coordinator", "--upload-slots", "0"], "--upload-slots: must be > 0"),
    (["coordinator", "--upload-slots", "65", "--port", "0"], "upload_slots must be in [1, 64]"),
    (["coordinator", "--verify-fraction", "1.5"], "--verify-fraction: must be in [0, 1]"),
    (["coordinator", "--probation-tasks", "-1"], "--probation-tasks: must be >= 0"),
    (["coordinator", "--verify-memory-mb", "-1"], "--verify-memory-mb: must be >= 0"),
    (["worker"], "--coordinator URL is required"),
    (["worker", "--coordinator", "127.0.0.1:8000"], "must be an http(s) URL"),
    (["worker", "--coordinator", "http://127.0.0.1:1", "--device", "tpu"], "--device must be"),
    (["worker", "--coordinator", "http://127.0.0.1:1", "--codec", "zip"], "invalid choice"),
    (["worker", "--coordinator", "http://127.0.0.1:1", "--memory-gb", "2", "--model-cache-gb",
      "4"], "--model-cache-gb 4 exceeds --memory-gb 2"),
    (["worker", "--coordinator", "http://127.0.0.1:1", "--gpus-per-worker", "2"],
     "--gpus-per-worker groups the GPUs of --gpus"),
    (["worker", "--coordinator", "http://127.0.0.1:1", "--gpus", "0,1,2", "--cpu-standins",
      "--gpus-per-worker", "2"], "the 3 GPU(s) of --gpus do not split into groups of 2"),
    (["worker", "--coordinator", "http://127.0.0.1:1", "--gpus", "0,1", "--cpu-standins",
      "--device-map", "auto"], "use --gpus-per-worker N"),
    (["worker", "--coordinator", "http://127.0.0.1:1", "--device", "cpu", "--device-map",
      "auto"], "use it with --device cuda, not cpu"),
    (["worker", "--coordinator", "http://127.0.0.1:1", "--device", "cpu", "--sampler", "vllm"],
     "--sampler vllm needs a CUDA device, not cpu"),
    (["worker", "--coordinator", "http://127.0.0.1:1", "--vllm-memory", "2"],
     "--vllm-memory: must be in [0, 1]"),
    (["launch"], "invalid choice"),
    (["train", "--dataset", "/nonexistent.jsonl"], "no such file"),
    (["train", "--dataset", "x.jsonl", "--outer-optimizer", "adam"], "invalid choice"),
])
def test_bad_flags_say_what_is_wrong(args, message):
    res = _cli(*args)
    assert res.returncode == 2, res
    assert message in res.stderr


def test_bad_environment_value_is_named():
    res = _cli("coordinator", "--help", env={"MAX_STALENESS": "lots"})
    assert res.returncode != 0 and "MAX_STALENESS='lots'" in res.stderr


def _parsers(parser: argparse.ArgumentParser, name: str = "signal"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help_and_its_default_shows():
    from rewardsignal.cli import build_parser

    for name, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.default not in (None, False, argparse.SUPPRESS):
                shown = formatter._get_help_string(action)
                assert "default" in shown, f"{name} {action.option_strings[0]}: {shown!r}"
    coordinator = dict(_parsers(build_parser()))["signal coordinator"].format_help()
    assert "(default: 600.0)" in coordinator  # --round-timeout-s


def test_duration_flags_end_in_s_and_keep_their_old_names():
    from rewardsignal.cli import build_parser

    new = build_parser().parse_args(["coordinator", "--round-timeout-s", "5",
                                     "--tick-interval-s", "0.5"])
    old = build_parser().parse_args(["coordinator", "--round-timeout-sec", "5",
                                     "--tick-interval-sec", "0.5"])
    assert (new.round_timeout_s, new.tick_interval_s) == (old.round_timeout_s,
                                                          old.tick_interval_s) == (5.0, 0.5)
    train = build_parser().parse_args(["train", "--dataset", "d.jsonl",
                                       "--num-tasks-per-round", "3", "--round-timeout-sec", "9"])
    assert (train.tasks_per_round, train.round_timeout_s) == (3, 9.0)


def test_coordinator_url_from_signal_url_or_its_old_name():
    for var in ("SIGNAL_URL", "SIGNAL_COORDINATOR"):
        res = _cli("worker", env={var: "127.0.0.1:8000", "SIGNAL_URL" if var != "SIGNAL_URL"
                                  else "SIGNAL_COORDINATOR": ""})
        assert res.returncode == 2 and "'127.0.0.1:8000' " not in res.stdout
        assert "must be an http(s) URL, got '127.0.0.1:8000'" in res.stderr


def test_verification_knobs_from_flags_and_environment():
    from rewardsignal.cli import build_parser, coordinator_config

    args = build_parser().parse_args(["coordinator", "--verify-fraction", "0.2",
                                      "--probation-tasks", "9", "--verify-memory-mb", "64"])
    cfg = coordinator_config(args)
    assert (cfg.verify_fraction, cfg.probation_tasks, cfg.verify_memory_mb) == (0.2, 9, 64)
    res = _cli("coordinator", "--port", "0", env={"SIGNAL_VERIFY_FRACTION": "3"})
    assert res.returncode != 0 and "verify_fraction must be in [0, 1]" in res.stderr


def test_console_scripts_exist():
    for name in ("signal", "signal-coordinator", "signal-worker"):
        exe = os.path.join(os.path.dirname(sys.executable), name)
        res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "usage:" in res.stdout


@pytest.mark.slow
def test_demo_runs_and_loss_falls(tmp_path):
    res = _cli("demo", "--steps", "25", "--out", str(tmp_path / "demo"), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    import re

    m = re.search(r"Loss (\d+\.\d+) -> (\d+\.\d+) \((\d+)% lower", out)
    assert m, out
    assert float(m.group(2)) < 0.7 * float(m.group(1))
    assert "mean of the last 3" in out
    assert "\\x" not in out  # samples print as text, not escapes
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").exists()
    assert "/metrics" in out and "Coordinator and workers stopped." in out


def test_demo_samples_print_as_text():
    from rewardsignal.demo import readable

    assert readable("4") == '"4"'
    assert readable("\x04\x04a\nb") == '"··a b"'
    assert readable("\x04\x04") == '"··" (no readable text yet)'
    assert readable("\x04\ufffd") == '"··" (no readable text yet)'


def test_make_clean_removes_the_demo_directory():
    import shutil
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("no make here")
    res = subprocess.run(["make", "-n", "clean"], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "signal-demo" in res.stdout.split()


def test_keys_create_list_revoke(tmp_path):
    res = _cli("keys", "create", "--data-dir", str(tmp_path), "--name", "alice")
    assert res.returncode == 0 and res.stdout.strip().startswith("sk-")
    assert "shown only this once" in res.stderr
    res = _cli("keys", "create", "--data-dir", str(tmp_path), "--name", "fleet", "--worker")
    assert res.stdout.strip().startswith("wt-")
    assert "already exists" in _cli("keys", "create", "--data-dir", str(tmp_path), "--name",
                                    "alice").stderr
    res = _cli("keys", "create", "--data-dir", str(tmp_path), "--name", "tk", "--prefix", "tml")
    assert res.returncode == 0 and res.stdout.strip().startswith("tml-")
    res = _cli("keys", "create", "--data-dir", str(tmp_path), "--name", "x", "--prefix", "TM-")
    assert res.returncode == 2 and "--prefix must be" in res.stderr
    listing = _cli("keys", "list", "--data-dir", str(tmp_path)).stdout
    assert "alice" in listing and "fleet" in listing and "active" in listing
    assert key_not_in(listing)
    assert _cli("keys", "revoke", "--data-dir", str(tmp_path), "alice").returncode == 0
    assert "revoked" in _cli("keys", "list", "--data-dir", str(tmp_path)).stdout
    res = _cli("keys", "revoke", "--data-dir", str(tmp_path), "nobody")
    assert res.returncode == 2 and "no active key named 'nobody'" in res.stderr


def key_not_in(text: str) -> bool:
    """Listing shows names, never key material."""
    return "sk-" not in text and "wt-" not in text and "tml-" not in text
