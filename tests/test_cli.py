"""The command line as a user meets it: wrong flags, refused exposure, the demo."""

from __future__ import annotations

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
    assert not (tmp_path / "runs").exists()  # refused before touching anything


@pytest.mark.parametrize("args, message", [
    (["coordinator", "--port", "99999"], "port must be <= 65535"),
    (["coordinator", "--delta-norm-max", "-1"], "must be > 0"),
    (["coordinator", "--max-staleness", "x"], "is not an integer"),
    (["coordinator", "--upload-slots", "0"], "--upload-slots: must be > 0"),
    (["coordinator", "--upload-slots", "65", "--port", "0"], "upload_slots must be in [1, 64]"),
    (["coordinator", "--verify-fraction", "1.5"], "--verify-fraction: must be in [0, 1]"),
    (["coordinator", "--probation-tasks", "-1"], "--probation-tasks: must be >= 0"),
    (["worker"], "--coordinator URL is required"),
    (["worker", "--coordinator", "127.0.0.1:8000"], "must be an http(s) URL"),
    (["worker", "--coordinator", "http://127.0.0.1:1", "--device", "tpu"], "--device must be"),
    (["worker", "--coordinator", "http://127.0.0.1:1", "--codec", "zip"], "invalid choice"),
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


def test_verification_knobs_from_flags_and_environment():
    from rewardsignal.cli import build_parser, coordinator_config

    args = build_parser().parse_args(["coordinator", "--verify-fraction", "0.2",
                                      "--probation-tasks", "9"])
    cfg = coordinator_config(args)
    assert (cfg.verify_fraction, cfg.probation_tasks) == (0.2, 9)
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

    m = re.search(r"Loss (\d+\.\d+) -> (\d+\.\d+) \((\d+)% lower\)", out)
    assert m, out
    assert float(m.group(2)) < 0.7 * float(m.group(1))
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").exists()
    assert "/metrics" in out and "Coordinator and workers stopped." in out


def test_keys_create_list_revoke(tmp_path):
    res = _cli("keys", "create", "--data-dir", str(tmp_path), "--name", "alice")
    assert res.returncode == 0 and res.stdout.strip().startswith("sk-")
    assert "shown only this once" in res.stderr
    res = _cli("keys", "create", "--data-dir", str(tmp_path), "--name", "fleet", "--worker")
    assert res.stdout.strip().startswith("wt-")
    assert "already exists" in _cli("keys", "create", "--data-dir", str(tmp_path), "--name",
                                    "alice").stderr
    listing = _cli("keys", "list", "--data-dir", str(tmp_path)).stdout
    assert "alice" in listing and "fleet" in listing and "active" in listing
    assert key_not_in(listing)
    assert _cli("keys", "revoke", "--data-dir", str(tmp_path), "alice").returncode == 0
    assert "revoked" in _cli("keys", "list", "--data-dir", str(tmp_path)).stdout
    res = _cli("keys", "revoke", "--data-dir", str(tmp_path), "nobody")
    assert res.returncode == 2 and "no active key named 'nobody'" in res.stderr


def key_not_in(text: str) -> bool:
    """Listing shows names, never key material."""
    return "sk-" not in text and "wt-" not in text
