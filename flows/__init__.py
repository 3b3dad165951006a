"""Prefect flows: they compose stage tasks and nothing else (steps.py holds what several flows compose);
`entry`, what each flow does first whoever starts it (the CLI or a Prefect worker); and `cli`, the `rmens`
command, which sits above the flows because it runs them (`services`: the local servers it starts, stops and
checks)."""
