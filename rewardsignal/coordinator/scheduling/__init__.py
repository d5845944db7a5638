"""Scheduling: workers, tasks, leases, shard planning, stragglers, upload slots."""
