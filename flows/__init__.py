"""Prefect flows: they compose tasks and nothing else; and `cli`, the `rmens` command that runs them."""
