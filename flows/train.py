"""Train one reward ensemble (cached) and register it in MLflow."""

from __future__ import annotations

from prefect import flow

from flows.entry import entry_point
from rmens.pipeline.config import TrainFlowConfig
from rmens.pipeline.plan import train_one
from rmens.preflight import check_before_work
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.stager import Stager, flow_run_name, flow_run_tags
from tasks.runtime.tracking import parent_run


@flow(name="rmens-train", flow_run_name=flow_run_name("train"), validate_parameters=False)
@entry_point
def train(config: TrainFlowConfig = TrainFlowConfig(), refresh: bool = False) -> dict:
    check_before_work(config)
    paths = ProjectPaths.at(config.project_dir).make()
    with parent_run(paths, f"train:{config.label}", config, tags=flow_run_tags()) as ctx, \
            Stager(ctx, refresh, config.log_model, config.registered_model) as stage:
        _, model = train_one(stage, config)
    return {"ensemble": model.path, "summary": model.summary, "states": stage.states,
            "parent_run_id": ctx.parent_run_id}
