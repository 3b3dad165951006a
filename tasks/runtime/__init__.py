"""What every flow shares, below the steps (which are library code: rmens.steps, rmens.pipeline,
rmens.experiment) and their Prefect adapter (tasks/steps.py).

    stager.py     how flows run a plan's steps as Prefect tasks (one key per call, stale outputs recomputed,
                  cache hits recorded)
    paths.py      where a project's artifacts, stores and locks live
    locks.py      step locks that a killed run cannot leave behind
    tracking.py   MLflow parent and child runs, cache-hit records, closing runs a dead process left open
"""
