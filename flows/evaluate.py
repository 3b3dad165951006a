"""Evaluate one policy with the gold: AlpacaEval-style win rate and MT-Bench."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.entry import entry_point
from rmens.pipeline.config import EvaluateFlowConfig
from rmens.pipeline.plan import evaluate_policy
from rmens.preflight import check_before_work
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.stager import Stager, flow_run_name, flow_run_tags
from tasks.runtime.tracking import parent_run


@flow(name="rmens-evaluate", flow_run_name=flow_run_name("evaluate"), validate_parameters=False)
@entry_point
def evaluate(config: EvaluateFlowConfig = EvaluateFlowConfig(), refresh: bool = False) -> dict:
    check_before_work(config)
    paths = ProjectPaths.at(config.project_dir).make()
    run_name = f"evaluate:{config.label}"
    with parent_run(paths, run_name, config, tags=flow_run_tags()) as ctx, Stager(ctx, refresh) as stage:
        result = evaluate_policy(stage, config)
        create_table_artifact(table=[{"metric": k, "value": v} for k, v in result.summary.items()],
                              key="rmens-evaluation", description=f"evaluation of {config.policy}")
    return {"summary": result.summary, "artifact": result.path, "states": stage.states}
