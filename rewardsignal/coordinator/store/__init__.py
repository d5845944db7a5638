"""Durable coordinator state: the database, keys, datasets, artifacts, pending gradients, job data."""
