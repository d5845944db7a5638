"""Ingest: the checks a worker submission passes, and its acceptance."""
