"""The Grafana dashboard queries only metrics the coordinator exports."""

import json
import re
from pathlib import Path

from rewardsignal.coordinator.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


def test_grafana_dashboard_uses_real_metrics():
    dash = json.loads((ROOT / "deploy/grafana/signal.json").read_text())
    exported = set()
    for fam in Metrics().registry.collect():
        for suffix in ("", "_total", "_bucket", "_count", "_sum"):
            exported.add(fam.name + suffix)
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\bsignal_[a-z_]+\b", target["expr"]))
    assert len(dash["panels"]) >= 10
    assert used and used <= exported, sorted(used - exported)
    assert "signal" in (ROOT / "deploy/prometheus.yml").read_text()
