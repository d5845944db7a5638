"""Where a step's time goes, from the coordinator's own metrics: each figure is
the change of a Prometheus sum or count over the measured steps, per step."""

from __future__ import annotations

import os
import statistics
from collections import defaultdict

# The worker's calls (what a slow link multiplies).
WORKER_ROUTES = ("/v1/workers/{worker_id}/lease", "/v1/runs/{run_id}/weights/{version}",
                 "/v1/workers/{worker_id}/upload-slot", "/v1/tasks/{task_id}/result",
                 "/v1/workers/{worker_id}/heartbeat")
_STAGES = (
    ("forward_backward on the coordinator (tasks out, gradient in, durable)",
     "signal_forward_backward_duration_seconds_sum"),
    ("  of which the worker's compute (as it reported it)",
     "signal_task_compute_seconds_sum"),
    ("optim_step on the coordinator (AdamW, new version)",
     "signal_step_duration_seconds_sum"),
    ("  of which checkpoint writes (on the step's path or not)",
     "signal_checkpoint_write_seconds_sum"),
)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Breakdown:
    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self._sdk: dict[str, list[float]] = defaultdict(list)
        self._before: dict[str, float] = {}
        self._delta: dict[str, float] = {}
        self.steps = 0

    def _snapshot(self) -> dict[str, float]:
        m = self.cluster.metric
        snap = {name: m(name) for _, name in _STAGES}
        snap["bytes"] = m("signal_bytes_served_total", kind="weights")
        snap["bytes_inline"] = m("signal_bytes_served_total", kind="weights_inline")
        snap["bytes_pushed"] = m("signal_bytes_served_total", kind="weights_pushed")
        for route in WORKER_ROUTES:
            snap[f"n {route}"] = m("signal_http_request_duration_seconds_count", route=route)
            snap[f"s {route}"] = m("signal_http_request_duration_seconds_sum", route=route)
        # CPU each process spent (on 2 shared cores, any of it beside the
        # worker's compute is time the compute does not get).
        snap["cpu coordinator"] = cpu_seconds(self.cluster.procs[0].pid)
        snap["cpu workers"] = sum(cpu_seconds(p.pid) for p in self.cluster.procs[1:])
        snap["cpu benchmark process (SDK + reference)"] = cpu_seconds(os.getpid())
        return snap

    def start(self) -> None:
        self._sdk.clear()
        self._before = self._snapshot()

    def stop(self, steps: int) -> None:
        after = self._snapshot()
        self.steps = steps
        self._delta = {k: (after[k] - self._before[k]) / steps for k in after}

    def sdk(self, what: str, seconds: float) -> None:
        self._sdk[what].append(seconds)

    def round_trips(self) -> float:
        return sum(self._delta[f"n {r}"] for r in WORKER_ROUTES)

    def report(self, ref_s: float, sig: list[float] | None = None) -> None:
        """``ref_s``: the reference's median step; ``sig``: Signal's timed steps."""
        d = self._delta
        print(f"per-step breakdown (mean over {self.steps} steps; reference step "
              f"{ref_s * 1000:.1f} ms):")
        for what, times in self._sdk.items():
            print(f"  SDK {what:<60} {statistics.median(times) * 1000:7.1f} ms (median)")
        for what, name in _STAGES:
            print(f"  {what:<64} {d[name] * 1000:7.1f} ms")
        print("  worker HTTP calls (count per step, server time per step):")
        for route in WORKER_ROUTES:
            print(f"    {route:<58} {d[f'n {route}']:4.2f}  {d[f's {route}'] * 1000:7.1f} ms")
        print("  CPU per step (user + system):")
        for k in ("cpu coordinator", "cpu workers", "cpu benchmark process (SDK + reference)"):
            print(f"    {k[4:]:<58} {d[k] * 1000:7.1f} ms")
        print(f"  worker round trips per step: {self.round_trips():.2f}")
        print(f"  weight bytes sent per step: {d['bytes']:,.0f} by GET, "
              f"{d['bytes_inline']:,.0f} inside tasks, {d['bytes_pushed']:,.0f} pushed to "
              "waiting leases")
        if sig:
            # What Signal adds around the compute, whatever the compute took: on a
            # shared VM the compute's own speed moves by a quarter between
            # seconds of a run, on both sides, and that noise swamps the ratio.
            # Slowdowns of the compute that Signal's processes cause are not in it.
            own = statistics.mean(sig) - d[_STAGES[1][1]]
            print(f"  Signal's own cost (mean step {statistics.mean(sig) * 1000:.1f} ms minus "
                  f"the worker's compute): {own * 1000:.1f} ms; (reference + it) / reference: "
                  f"{(ref_s + own) / ref_s:.3f}")
