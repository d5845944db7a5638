"""Experiment tracking: a run's step metrics in TensorBoard event files (read back
with TensorBoard's own reader) and in W&B (offline mode); bad choices are a 400."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
from apphelpers import FakeWorker, Harness, fake_step


def _need(module: str) -> None:
    """Skip without the extra, except where CI installs it (SIGNAL_REQUIRE_EXTRAS)."""
    if os.environ.get("SIGNAL_REQUIRE_EXTRAS"):
        __import__(module)  # an ImportError here fails the test: the extra is missing
    else:
        pytest.importorskip(module)


def _steps(h: Harness, run_id: str) -> None:
    worker = FakeWorker(h, "gpu-0")
    fake_step(h, worker, run_id, loss_sum=3.0, weight_sum=2.0)  # loss 1.5
    fake_step(h, worker, run_id, loss_sum=2.0, weight_sum=2.0)  # loss 1.0
    h.coordinator.services.trackers.flush()


def test_unknown_or_missing_backends_are_refused(tmp_path):
    h = Harness(tmp_path / "data")
    try:
        status, body = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny",
                                                            "log_to": ["mlflow"]})
        assert status == 400 and "log_to 'mlflow' is not one of" in body["error"]["message"]
        status, body = h.request("POST", "/v1/runs", json={
            "base_model": "signal-tiny", "wandb_project": "p"})
        assert status == 400 and "log_to does not include 'wandb'" in body["error"]["message"]
        for backend in ("tensorboard", "wandb"):
            status, body = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny",
                                                                "log_to": [backend]})
            if importlib.util.find_spec(backend) is None:
                assert status == 400, body
                assert f"pip install 'rewardsignal[{backend}]'" in body["error"]["message"]
            else:
                assert status == 201, body
        runs = h.request("GET", "/v1/runs", expect=200)[1]["runs"]
        assert len(runs) == sum(importlib.util.find_spec(b) is not None
                                for b in ("tensorboard", "wandb"))
    finally:
        h.close()


def test_steps_land_in_tensorboard_event_files(tmp_path):
    _need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    h = Harness(tmp_path / "data")
    try:
        _, run = h.request("POST", "/v1/runs", json={
            "base_model": "signal-tiny", "lora_r": 2, "log_to": ["tensorboard"],
            "learning_rate": 0.003}, expect=201)
        _steps(h, run["run_id"])
        events = EventAccumulator(str(tmp_path / "data" / "checkpoints" / run["run_id"]
                                      / "tensorboard"))
        events.Reload()
        loss = events.Scalars("train/loss")
        assert [(e.step, e.value) for e in loss] == [(1, 1.5), (2, 1.0)]
        assert [e.value for e in events.Scalars("train/learning_rate")] == pytest.approx(
            [0.003, 0.003])
        assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
        assert all(e.value > 0 for e in events.Scalars("train/tokens"))
    finally:
        h.close()


def test_steps_land_in_wandb_offline(tmp_path, monkeypatch):
    # Before wandb is first imported: it reads its settings then.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    _need("wandb")
    h = Harness(tmp_path / "data", log_to=("wandb",), wandb_project="signal-test")
    try:
        _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                           expect=201)
        _steps(h, run["run_id"])
        h.coordinator.services.trackers.close_run(run["run_id"])  # finish: flushes the log
        logs = list((tmp_path / "data" / "checkpoints" / run["run_id"] / "wandb").glob(
            f"offline-run-*-{run['run_id']}/run-{run['run_id']}.wandb"))
        assert len(logs) == 1
        # The offline log is W&B's own record format (read by `wandb sync`); the
        # history records carry each key and its JSON value. W&B's service process
        # writes it out shortly after finish() returns: wait for it, bounded.
        deadline = time.monotonic() + 30
        while b"train/loss" not in logs[0].read_bytes() and time.monotonic() < deadline:
            time.sleep(0.2)
        data = logs[0].read_bytes()
        for key in (b"train/loss", b"train/learning_rate", b"train/grad_norm", b"train/tokens"):
            assert key in data, key
        assert b"signal-test" in data  # the project
    finally:
        h.close()
