"""Train one reward ensemble (cached) and register it in MLflow."""

from __future__ import annotations

from prefect import flow

from flows.common import Stager, flow_run_tags
from rmens.config import TrainFlowConfig
from tasks.paths import ProjectPaths
from tasks.prepare_data import prepare_data
from tasks.prepare_models import prepare_models
from tasks.refs import ArtifactRef
from tasks.tracking import StageContext, parent_run
from tasks.train_ensemble import train_ensemble


def train_steps(stage: Stager, config: TrainFlowConfig) -> tuple[ArtifactRef, ArtifactRef]:
    stage(prepare_models, "models", names=[config.ensemble.backbone])
    data = stage(prepare_data, config.label, data=config.data)
    model = stage(train_ensemble, config.label, data=data, ensemble=config.ensemble, train_cfg=config.train,
                  label=config.label, registered_model=config.registered_model, log_model=config.log_model)
    return data, model


@flow(name="rmens-train", validate_parameters=True)
def train(config: TrainFlowConfig = TrainFlowConfig(), refresh: bool = False) -> dict:
    paths = ProjectPaths.at(config.project_dir).make()
    run_name = f"train:{config.label}"
    with parent_run(paths, run_name, config, tags=flow_run_tags()) as ctx, Stager(ctx, refresh) as stage:
        _, model = train_steps(stage, config)
    return {"ensemble": model.path, "summary": model.summary, "states": stage.states, "parent_run_id": _id(ctx)}


def _id(ctx: StageContext) -> str | None:
    return ctx.parent_run_id
