"""Stage tasks of the reference experiment: each runs one library step (rmens.experiment.steps) under
Prefect's cache and an MLflow child run named `<step>:<label>`; flows/experiment.py orders them with
rmens.experiment.plan, the same plan the plain runner follows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task

from rmens.experiment.plan import RESUMABLE, STEP_CODE
from tasks.runtime.keys import experiment_stage
from tasks.runtime.refs import ArtifactRef
from tasks.runtime.stage import params_for_tracking, run_stage, stage_task
from tasks.runtime.tracking import StageContext, client_for, set_tags

# What each step's MLflow run keeps besides its metrics: the small result files at the top of its folder.
LOGGED_SUFFIXES = (".json", ".csv", ".png", ".md")


def _folders(value: Any) -> Any:
    """Upstream artifacts become the folders the library step reads."""
    if isinstance(value, ArtifactRef):
        return value.require().folder
    if isinstance(value, dict):
        return {k: _folders(v) for k, v in value.items()}
    return value


def _log_results(folder: Path) -> None:
    import mlflow

    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in LOGGED_SUFFIXES and path.name != "ref.json":
            mlflow.log_artifact(str(path))
    if (folder / "ppo_curves").is_dir():
        mlflow.log_artifacts(str(folder / "ppo_curves"), "ppo_curves")


def _task(step: str) -> Task:
    stage = experiment_stage(step)

    @stage_task(stage, timeout_seconds=24 * 3600)
    def experiment_step(ctx: StageContext, label: str, inputs: dict[str, Any]) -> ArtifactRef:
        def build(folder: Path, run_id: str) -> dict:
            from rmens.experiment.steps import STEPS

            set_tags(client_for(ctx), run_id, {"rmens.step": step, "rmens.arm": label})
            summary = STEPS[step](folder, **_folders(inputs))
            _log_results(folder)
            return summary

        return run_stage(ctx, stage, {"label": label, "inputs": inputs}, build, resume=step in RESUMABLE,
                         log_params={"label": label, **params_for_tracking(inputs)}, run_name=f"{step}:{label}")

    return experiment_step


EXPERIMENT_TASKS: dict[str, Task] = {step: _task(step) for step in STEP_CODE}
