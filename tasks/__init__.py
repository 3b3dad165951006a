"""Prefect tasks, one module per pipeline stage. Each wraps a capability of `rmens` with a cache key,
retries, a lock and an MLflow child run, and returns a small JSON reference to its output folder; what the
stages share (keys, references, paths, locks, tracking, the Stager) is the runtime in tasks/runtime/, and
the registered MLflow model (logging, serving, promotion) is tasks/registry/."""
