"""The coordinator's ticker work: lease expiry, upload-slot expiry, and the
gauges and per-worker series that ``/metrics`` shows."""

from __future__ import annotations

import logging

from rewardsignal.coordinator.metrics import Metrics
from rewardsignal.coordinator.scheduling.scheduler import Scheduler
from rewardsignal.coordinator.scheduling.slots import UploadSlots

log = logging.getLogger("signal.coordinator")


class Monitor:
    def __init__(self, scheduler: Scheduler, upload_slots: UploadSlots, metrics: Metrics) -> None:
        self.scheduler = scheduler
        self.upload_slots = upload_slots
        self.metrics = metrics
        self._was_active: dict[str, bool] = {}
        self._shown_workers: set[str] = set()  # names with per-worker series

    def tick(self, worker_retention_s: float) -> list[str]:
        """Expire leases and slots, forget long-gone workers (their ids are
        returned), update the gauges."""
        self.scheduler.expire_leases()
        self.upload_slots.expire()
        pruned = self.scheduler.prune(worker_retention_s)
        counts = self.scheduler.counts()
        self.metrics.tasks_pending.set(counts["pending"])
        self.metrics.tasks_leased.set(counts["leased"])
        self.metrics.verify_held_bytes.set(self.scheduler.holds.used)
        ws = list(self.scheduler.workers.values())
        self.metrics.workers.labels("registered").set(sum(not w.departed for w in ws))
        self.metrics.workers.labels("active").set(sum(w.active for w in ws))
        self.metrics.workers.labels("quarantined").set(sum(w.quarantined for w in ws))
        self._worker_series()
        for wid in pruned:
            self._was_active.pop(wid, None)
        return pruned

    def _worker_series(self) -> None:
        # Per-worker series: set for active workers, removed for those that left
        # (not cleared and rebuilt: creating 2,000 children took 11 ms a tick with
        # 1,000 workers, longer while submission threads hold the GIL).
        ws = list(self.scheduler.workers.values())
        shown = {w.name for w in ws if w.active}
        for name in self._shown_workers - shown:
            self.metrics.worker_tasks.remove(name)
            self.metrics.worker_rate.remove(name)
        self._shown_workers = shown
        for w in ws:
            if w.active:
                self.metrics.worker_tasks.labels(w.name).set(w.tasks_completed)
                self.metrics.worker_rate.labels(w.name).set(w.tokens_per_s or 0.0)
            if w.active != self._was_active.get(w.worker_id, True):
                log.info("worker %s id=%s name=%s", "joined" if w.active else "left",
                         w.worker_id, w.name)
            self._was_active[w.worker_id] = w.active
