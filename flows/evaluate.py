"""Evaluate one policy with the judge: AlpacaEval-style win rate and MT-Bench."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.steps import train_judge
from rmens.config import EvaluateFlowConfig
from tasks.evaluate import evaluate as evaluate_task
from tasks.prepare_models import prepare_models
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.stager import Stager, flow_run_name, flow_run_tags
from tasks.runtime.tracking import parent_run


@flow(name="rmens-evaluate", flow_run_name=flow_run_name("evaluate"), validate_parameters=True)
def evaluate(config: EvaluateFlowConfig = EvaluateFlowConfig(), refresh: bool = False) -> dict:
    paths = ProjectPaths.at(config.project_dir).make()
    run_name = f"evaluate:{config.label}"
    with parent_run(paths, run_name, config, tags=flow_run_tags()) as ctx, Stager(ctx, refresh) as stage:
        stage(prepare_models, "models", names=[config.policy])
        judge = train_judge(stage, config)
        result = stage(evaluate_task, config.label, label=config.label, policy=config.policy,
                       eval_cfg=config.evaluate, judge_cfg=config.judge, judge=judge)
        create_table_artifact(table=[{"metric": k, "value": v} for k, v in result.summary.items()],
                              key="rmens-evaluation", description=f"evaluation of {config.policy}")
    return {"summary": result.summary, "artifact": result.path, "states": stage.states}
