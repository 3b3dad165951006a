"""Prefect and MLflow around the library's steps: tasks/steps.py turns any declared step (rmens.steps) into
a cached, locked, retried Prefect task with an MLflow child run; tasks/publish.py puts a pipeline's
comparison where people look; tasks/registry/ is the registered MLflow model (logging, serving,
promotion); what flows share is the runtime in tasks/runtime/."""
