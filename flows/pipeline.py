"""The whole chain over the arms (rmens.pipeline.plan) as a Prefect flow with MLflow tracking.

Every common upstream step is computed once: the samples are drawn once for all arms, each run of an arm
is trained once for all aggregation rules and scored once (rules re-aggregate stored member scores).
"""

from __future__ import annotations

from prefect import flow

from flows.entry import entry_point
from rmens.pipeline.config import PipelineConfig, load_preset
from rmens.pipeline.plan import run_pipeline
from rmens.preflight import check_before_work
from rmens.steps import Store
from rmens.steps.runner import check
from tasks.publish import publish
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.stager import Stager, flow_run_name, flow_run_tags
from tasks.runtime.tracking import parent_run


@flow(name="rmens-pipeline", flow_run_name=flow_run_name("pipeline"), validate_parameters=False)
@entry_point
def pipeline(config: PipelineConfig | None = None, preset: str = "smoke", overrides: list[str] | None = None,
             refresh: bool = False) -> dict:
    """Run every step of the pipeline; returns {label: summary} and the Prefect state of each step.

    Give a full `config`, or a `preset` name with dotted `overrides` (what deployments use).
    """
    config = config or load_preset(preset, overrides)
    check_before_work(config)
    paths = ProjectPaths.at(config.project_dir).make()
    total = len(check(run_pipeline, Store(paths.artifacts), config).outputs)  # keys only: nothing runs
    with parent_run(paths, f"pipeline:{config.name}", config, tags=flow_run_tags()) as ctx, \
            Stager(ctx, refresh, config.log_models, config.registered_model, total,
                   resources=config.resources) as stage:
        outputs = stage.run_plan(run_pipeline, config)
        publish(ctx, outputs["report"], f"rmens pipeline '{config.name}'")
    return {"report": str(outputs["report"].file("report")), "parent_run_id": ctx.parent_run_id,
            "experiment_id": ctx.experiment_id,
            "states": stage.states, "summaries": {label: output.summary for label, output in outputs.items()}}
