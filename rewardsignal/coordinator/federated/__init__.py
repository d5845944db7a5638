"""Federated rounds: jobs, the round loop (issue / collect / close) and combination strategies."""
