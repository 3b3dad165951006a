"""Scheduled retraining: retrain on the current data, evaluate on held-out pairs, and move the registered
model's champion alias only when the new model beats the current champion; otherwise keep it and say why."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from rmens.pipeline.config import RetrainConfig
from rmens.pipeline.data import read_pairs
from rmens.pipeline.plan import train_one
from tasks.registry import promote_if_better
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.stager import Stager, flow_run_name, flow_run_tags
from tasks.runtime.tracking import client_for, log_metrics, parent_run, set_tags


@flow(name="rmens-retrain", flow_run_name=flow_run_name("retrain"), validate_parameters=True)
def retrain(config: RetrainConfig = RetrainConfig(), refresh: bool = False) -> dict:
    paths = ProjectPaths.at(config.project_dir).make()
    with parent_run(paths, f"retrain:{config.label}", config, tags=flow_run_tags()) as ctx, \
            Stager(ctx, refresh, config.log_model, config.registered_model) as stage:
        data, model = train_one(stage, config)
        held_out = read_pairs(data, "val")
        if not held_out:
            raise ValueError("retrain needs held-out pairs: set data.val_fraction > 0")
        client = client_for(ctx)
        decision = promote_if_better(client, config.registered_model, config.champion_alias,
                                     str(model.summary["model_version"]), held_out, config.metric,
                                     config.min_improvement)
        set_tags(client, ctx.parent_run_id, {
            "rmens.decision": "promoted" if decision.promote else "kept", "rmens.reason": decision.reason,
            "rmens.candidate_version": decision.candidate_version,
            "rmens.champion_version": str(decision.champion_after)})
        log_metrics(client, ctx.parent_run_id, {f"candidate_{k}": v for k, v in decision.candidate.items()})
        if decision.champion is not None:
            log_metrics(client, ctx.parent_run_id, {f"champion_{k}": v for k, v in decision.champion.items()})
        create_markdown_artifact(key="rmens-retrain", description="champion decision",
                                 markdown=decision.markdown(config.registered_model))
    return {"promoted": decision.promote, "reason": decision.reason, "candidate_version": decision.candidate_version,
            "champion_version": decision.champion_after, "states": stage.states}
