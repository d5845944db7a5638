"""Prometheus metrics of one coordinator (its own registry, so several apps can
live in one process). Label values are bounded: run ids (a run is a long-lived
object an operator created), rejection reasons (a closed set), routes (the
registered route templates), kinds, codecs."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# Counters' and histograms' ``*_created`` series (process-start timestamps) double
# the exposition for nothing a dashboard uses.
disable_created_metrics()

_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.steps = Counter("signal_steps", "optim_steps completed", ["run_id"], registry=r)
        self.step_duration = Histogram("signal_step_duration_seconds",
                                       "time from optim_step request to new version",
                                       ["run_id"], buckets=_STEP_BUCKETS, registry=r)
        self.fb_duration = Histogram("signal_forward_backward_duration_seconds",
                                     "time to compute one forward_backward across workers",
                                     ["run_id"], buckets=_STEP_BUCKETS, registry=r)
        self.task_compute = Histogram("signal_task_compute_seconds",
                                      "a task's compute time on its worker, as the worker "
                                      "reported it with an accepted result", ["kind"],
                                      buckets=_STEP_BUCKETS, registry=r)
        self.version = Gauge("signal_run_version", "current version of the run", ["run_id"],
                             registry=r)
        self.train_loss = Gauge("signal_train_loss", "weighted mean loss of the last "
                                "forward_backward", ["run_id"], registry=r)
        self.tokens = Counter("signal_tokens_processed", "tokens in accepted updates",
                              ["run_id"], registry=r)
        self.updates_accepted = Counter("signal_updates_accepted", "accepted submissions",
                                        ["kind"], registry=r)
        self.updates_rejected = Counter("signal_updates_rejected", "rejected submissions",
                                        ["reason"], registry=r)
        self.duplicates = Counter("signal_updates_duplicate", "duplicate submissions ignored",
                                  registry=r)
        self.update_norm = Histogram("signal_update_norm", "norm of accepted updates per unit "
                                     "of loss weight", buckets=(1e-4, 1e-3, 1e-2, 0.1, 1, 10,
                                                                100, 1e3), registry=r)
        self.staleness = Histogram("signal_update_staleness", "versions between task and "
                                   "acceptance", buckets=(0, 1, 2, 4, 8, 16), registry=r)
        self.tasks_pending = Gauge("signal_tasks_pending", "tasks waiting for a worker",
                                   registry=r)
        self.tasks_leased = Gauge("signal_tasks_leased", "tasks leased to a worker", registry=r)
        self.tasks_expired = Counter("signal_tasks_expired", "leases that expired", registry=r)
        self.tasks_retried = Counter("signal_tasks_retried", "tasks returned to the queue",
                                     registry=r)
        self.tasks_reissued = Counter("signal_tasks_reissued", "straggler tasks leased twice",
                                      registry=r)
        self.workers = Gauge("signal_workers", "workers by state", ["state"], registry=r)
        self.bytes_in = Counter("signal_bytes_received", "bytes of submissions received",
                                ["kind", "codec"], registry=r)
        self.bytes_out = Counter("signal_bytes_served", "bytes served", ["kind"], registry=r)
        self.checkpoint_seconds = Histogram("signal_checkpoint_write_seconds",
                                            "time to write a checkpoint",
                                            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
                                            registry=r)
        self.checkpoint_bytes = Gauge("signal_checkpoint_bytes", "size of the last checkpoint",
                                      ["run_id"], registry=r)
        self.rounds = Counter("signal_rounds", "federated rounds closed", ["run_id"], registry=r)
        self.round_duration = Histogram("signal_round_duration_seconds",
                                        "time from round start to new version", ["run_id"],
                                        buckets=_STEP_BUCKETS, registry=r)
        self.round_failures = Counter("signal_round_failures", "round attempts that closed "
                                      "without enough accepted updates", ["run_id"], registry=r)
        self.eval_loss = Gauge("signal_eval_loss", "held-out loss after the last round",
                               ["run_id"], registry=r)
        self.worker_tasks = Gauge("signal_worker_tasks_completed", "tasks a worker completed",
                                  ["worker"], registry=r)
        self.worker_rate = Gauge("signal_worker_tokens_per_second", "a worker's measured "
                                 "throughput (moving average)", ["worker"], registry=r)
        self.lease_seconds = Histogram(
            "signal_lease_seconds", "lease request to task handed out; waited=yes when no "
            "task was pending on arrival", ["waited"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                     120), registry=r)
        self.loop_lag = Histogram(
            "signal_event_loop_lag_seconds", "how late the coordinator's event loop ran a "
            "timer (each tick): the wait any request sees before its handler starts",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.verify_tasks = Counter("signal_verification_tasks", "tasks issued only to check "
                                    "another worker's result, by role (second, tiebreak)",
                                    ["role"], registry=r)
        self.verdicts = Counter("signal_verification_verdicts", "checks decided, by outcome "
                                "(agree, first_wrong, checker_wrong, unresolved)", ["outcome"],
                                registry=r)
        self.verify_skipped = Counter("signal_verification_skipped", "checks that could not "
                                      "be made, by reason", ["reason"], registry=r)
        self.verify_same_token = Counter("signal_verification_same_token", "checks computed "
                                         "by a worker under the checked worker's token (no "
                                         "other was live)", registry=r)
        self.verify_held_bytes = Gauge(
            "signal_verification_held_bytes", "gradients held for their checks, and leases "
            "whose results will be (bounded by --verify-memory-mb)", registry=r)
        self.verify_overhead = Gauge("signal_verification_overhead", "check tasks / all "
                                     "checkable tasks (the compute verification costs)",
                                     registry=r)
        self.recomputed = Counter("signal_verification_recomputed", "shards computed again "
                                  "because their worker was quarantined, by where (request: "
                                  "in the running request; step: by optim_step)", ["where"],
                                  registry=r)
        self.quarantines = Counter("signal_quarantines", "workers quarantined, by reason "
                                   "(rejections, verification)", ["reason"], registry=r)
        self.request_latency = Histogram("signal_http_request_duration_seconds",
                                         "HTTP request latency by route", ["route", "method"],
                                         buckets=_LATENCY_BUCKETS, registry=r)

    def forget_run(self, run_id: str) -> None:
        """Remove every series labelled with a deleted run."""
        for metric in (self.steps, self.step_duration, self.fb_duration, self.version,
                       self.train_loss, self.tokens, self.checkpoint_bytes, self.rounds,
                       self.round_duration, self.round_failures, self.eval_loss):
            metric.remove(run_id)  # a series the run never reported is no error
