"""Regenerate deploy/grafana/signal.json from the panel list below."""

import json
from pathlib import Path

PANELS = [
    # (title, unit, [(expr, legend)], width)
    ("Run version", "none", [("signal_run_version", "{{run_id}}")], 8),
    ("Train loss", "none", [("signal_train_loss", "{{run_id}} train")], 8),
    ("Held-out loss (federated)", "none", [("signal_eval_loss", "{{run_id}} eval")], 8),
    ("Steps and rounds per minute", "none",
     [("60 * rate(signal_steps_total[5m])", "{{run_id}} steps"),
      ("60 * rate(signal_rounds_total[5m])", "{{run_id}} rounds")], 8),
    ("Step / round duration p95", "s",
     [("histogram_quantile(0.95, sum by (le, run_id) "
       "(rate(signal_step_duration_seconds_bucket[5m])))", "{{run_id}} step"),
      ("histogram_quantile(0.95, sum by (le, run_id) "
       "(rate(signal_round_duration_seconds_bucket[5m])))", "{{run_id}} round")], 8),
    ("Updates accepted / rejected per minute", "none",
     [("sum by (kind) (60 * rate(signal_updates_accepted_total[5m]))", "accepted {{kind}}"),
      ("sum by (reason) (60 * rate(signal_updates_rejected_total[5m]))",
       "rejected {{reason}}")], 8),
    ("Workers", "none", [("signal_workers", "{{state}}")], 8),
    ("Worker throughput", "none", [("signal_worker_tokens_per_second", "{{worker}}")], 8),
    ("Tasks", "none", [("signal_tasks_pending", "pending"), ("signal_tasks_leased", "leased"),
                       ("60 * rate(signal_tasks_expired_total[5m])", "expired / min"),
                       ("60 * rate(signal_tasks_retried_total[5m])", "retried / min")], 8),
    ("Tokens processed per second", "none",
     [("rate(signal_tokens_processed_total[5m])", "{{run_id}}")], 8),
    ("Bytes in / out", "Bps",
     [("sum by (kind, codec) (rate(signal_bytes_received_total[5m]))", "in {{kind}} {{codec}}"),
      ("sum by (kind) (rate(signal_bytes_served_total[5m]))", "out {{kind}}")], 8),
    ("Update staleness and norm p95", "none",
     [("histogram_quantile(0.95, sum by (le) (rate(signal_update_staleness_bucket[5m])))",
       "staleness"),
      ("histogram_quantile(0.95, sum by (le) (rate(signal_update_norm_bucket[5m])))", "norm")],
     8),
    ("Checkpoint write p95", "s",
     [("histogram_quantile(0.95, sum by (le) "
       "(rate(signal_checkpoint_write_seconds_bucket[5m])))", "write"),
      ("signal_checkpoint_bytes", "{{run_id}} bytes")], 12),
    ("HTTP latency p99 by route", "s",
     [("histogram_quantile(0.99, sum by (le, route) "
       "(rate(signal_http_request_duration_seconds_bucket[5m])))", "{{route}}")], 12),
]


def main() -> None:
    panels, x, y = [], 0, 0
    for i, (title, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"},
            "gridPos": {"x": x, "y": y, "w": width, "h": 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"expr": e, "legendFormat": lg, "refId": chr(65 + j),
                         "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}}
                        for j, (e, lg) in enumerate(targets)],
        })
        x += width
    dash = {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "title": "Signal", "uid": "signal-coordinator", "schemaVersion": 39, "version": 1,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"}, "tags": ["signal"],
        "panels": panels,
    }
    out = Path(__file__).resolve().parent.parent / "deploy/grafana/signal.json"
    out.write_text(json.dumps(dash, indent=2) + "\n")
    print(f"wrote {len(panels)} panels to {out}")


if __name__ == "__main__":
    main()
