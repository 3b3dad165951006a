"""Prefect tasks: one per pipeline stage. Each wraps a capability of `rmens` with a cache key, retries,
a lock, an MLflow child run, and returns a small JSON reference to its output folder."""
