"""Steps, the store of their outputs and the plain runner: what every pipeline of rmens is made of.

A step is a library function `fn(folder, **inputs) -> summary` declared once with `@step(...)` beside it
(rmens.steps.contract). A plan (rmens.pipeline.plan, rmens.experiment.plan) calls steps in order through
a runner; the runner keys each call, reuses a finished folder from the store or computes it
(rmens.steps.store), and hands the output on. rmens.steps.runner runs a plan in-process; tasks/steps.py
runs the same plan as Prefect tasks with MLflow runs, with the same keys and folders.
"""

from rmens.steps.contract import Resources, Step, report_metrics, step
from rmens.steps.store import Output, Store, step_key

__all__ = ["Output", "Resources", "Step", "Store", "report_metrics", "step", "step_key"]
