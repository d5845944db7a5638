"""Runs: their state, accumulated gradients, requests, versions and the ordered
processing of their operations."""
