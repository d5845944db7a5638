"""/metrics: documented, parseable, and moving as training does."""

from __future__ import annotations

from pathlib import Path

import torch
from apphelpers import FakeWorker, Harness
from prometheus_client.parser import text_string_to_metric_families

from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.protocol import tensors_to_bytes

OPS_DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_every_metric_is_documented():
    text = OPS_DOC.read_text()
    names = {m.name for m in Metrics().registry.collect()}
    assert len(names) >= 25
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"docs/operations.md does not document {missing}"


def _scrape(h: Harness) -> dict[tuple[str, tuple], float]:
    _, body = h.request("GET", "/metrics", expect=200)
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_move_with_training(harness):
    h = harness
    _, run = h.request("POST", "/v1/runs", json={"base_model": "signal-tiny", "lora_r": 2},
                       expect=201)
    rid = run["run_id"]
    worker = FakeWorker(h, "gpu-0")
    before = _scrape(h)
    assert before[("signal_run_version", (("run_id", rid),))] == 0

    def step(corrupt: bool) -> None:
        _, req = h.request("POST", f"/v1/runs/{rid}/forward_backward",
                           json={"batch": [{"text": "hello"}]}, expect=202)
        task = worker.lease()
        shapes = h.coordinator.runs[rid].shapes
        grads = {k: torch.full(s, 0.01) for k, s in shapes.items()}
        lp = [[-1.0] * len(d["model_input"]) for d in task["payload"]["datums"]]
        if corrupt:
            bad = dict(grads)
            bad[sorted(bad)[0]] = torch.full(shapes[sorted(bad)[0]], float("nan"))
            code, _ = worker.submit(task, codec="fp32", tensors=tensors_to_bytes(bad),
                                    result={"loss_sum": 1.0, "weight_sum": 2.0, "logprobs": lp})
            assert code == 422
            task = worker.lease()
        code, _ = worker.submit(task, codec="fp32", tensors=tensors_to_bytes(grads),
                                result={"loss_sum": 1.0, "weight_sum": 2.0, "logprobs": lp},
                                duration_s=0.5)
        assert code == 200
        h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)
        _, req = h.request("POST", f"/v1/runs/{rid}/optim_step", json={}, expect=202)
        h.request("GET", f"/v1/requests/{req['request_id']}?timeout_s=5", expect=200)

    step(corrupt=False)
    step(corrupt=True)
    # optim_step checkpoints are written in the background: let them land.
    h.call(h.coordinator.services.versions.flush())
    after = _scrape(h)
    run_label = (("run_id", rid),)
    assert after[("signal_run_version", run_label)] == 2
    assert after[("signal_steps_total", run_label)] == 2
    assert after[("signal_train_loss", run_label)] == 0.5
    assert after[("signal_updates_rejected_total", (("reason", "nonfinite"),))] == 1
    assert after[("signal_updates_accepted_total", (("kind", "forward_backward"),))] == 2
    assert after[("signal_tokens_processed_total", run_label)] > 0
    assert not [k for k in after if k[0].endswith("_created")]  # switched off
    assert after[("signal_step_duration_seconds_count", run_label)] == 2
    assert after[("signal_checkpoint_write_seconds_count", ())] == 3  # versions 0, 1, 2
    assert after[("signal_bytes_received_total", (("codec", "fp32"), ("kind", "gradient")))] > 0
    assert after[("signal_worker_tasks_completed", (("worker", "gpu-0"),))] == 2
    assert after[("signal_workers", (("state", "active"),))] == 1
    latency = [k for k in after if k[0] == "signal_http_request_duration_seconds_count"]
    assert any(dict(k[1]).get("route") == "/v1/runs/{run_id}/{op}" for k in latency)
    # /v1/status carries the same story for the dashboard and the SDK.
    _, st = h.request("GET", "/v1/status", expect=200)
    assert st["rejections"] == {"nonfinite": 1}
    assert [r["version"] for r in st["runs"]] == [2]
    assert [hh["version"] for hh in st["runs"][0]["history"]] == [1, 2]
    assert st["workers"][0]["name"] == "gpu-0"


def test_per_worker_series_follow_workers_coming_and_going(harness):
    h = harness
    FakeWorker(h, "stays")
    leaving = FakeWorker(h, "leaves")
    h.coordinator.tick()
    names = {dict(k[1]).get("worker") for k in _scrape(h)
             if k[0] == "signal_worker_tokens_per_second"}
    assert names == {"stays", "leaves"}
    # Silent past the active window: its series go, the other's stay.
    h.coordinator.scheduler.workers[leaving.worker_id].last_seen -= 3600
    h.coordinator.tick()
    after = _scrape(h)
    names = {dict(k[1]).get("worker") for k in after if k[0] == "signal_worker_tokens_per_second"}
    assert names == {"stays"}
    assert ("signal_worker_tasks_completed", (("worker", "leaves"),)) not in after
    assert after[("signal_workers", (("state", "active"),))] == 1


def test_event_loop_lag_is_observed_each_tick(tmp_path):
    import asyncio

    h = Harness(tmp_path / "data", tick_interval_s=0.02)
    try:
        h.call(asyncio.sleep(0.3))
        count = _scrape(h)[("signal_event_loop_lag_seconds_count", ())]
        assert 3 <= count <= 16
    finally:
        h.close()
