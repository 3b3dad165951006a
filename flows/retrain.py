"""Scheduled retraining: retrain on the current data, evaluate on held-out pairs, and move the registered
model's champion alias only when the new model beats the current champion; otherwise keep it and say why."""

from __future__ import annotations

from mlflow import MlflowClient
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.common import Stager, flow_run_tags
from flows.train import train_steps
from rmens.config import RetrainConfig
from tasks.paths import ProjectPaths
from tasks.prepare_data import read_pairs
from tasks.registry import champion_version, decide, score_registered
from tasks.tracking import client_for, log_metrics, parent_run, set_tags


@flow(name="rmens-retrain", validate_parameters=True)
def retrain(config: RetrainConfig = RetrainConfig(), refresh: bool = False) -> dict:
    paths = ProjectPaths.at(config.project_dir).make()
    if not config.log_model:
        raise ValueError("retrain compares registered models: log_model must be true")
    run_name = f"retrain:{config.label}"
    with parent_run(paths, run_name, config, tags=flow_run_tags()) as ctx, Stager(ctx, refresh) as stage:
        data, model = train_steps(stage, config)
        held_out = read_pairs(data, "val")
        if not held_out:
            raise ValueError("retrain needs held-out pairs: set data.val_fraction > 0")
        client: MlflowClient = client_for(ctx)
        name, alias = config.registered_model, config.champion_alias
        candidate_version = str(model.summary["model_version"])
        current = champion_version(client, name, alias)
        candidate = score_registered(f"models:/{name}/{candidate_version}", held_out)
        if current == candidate_version:
            promote, reason = False, f"the candidate (version {current}) already is the champion: nothing changed"
            champion = candidate
        else:
            champion = score_registered(f"models:/{name}@{alias}", held_out) if current else None
            promote, reason = decide(config.metric, candidate, champion, config.min_improvement)
        if promote:
            client.set_registered_model_alias(name, alias, candidate_version)
        client.set_model_version_tag(name, candidate_version, "rmens.retrain_decision", reason)
        set_tags(client, ctx.parent_run_id, {"rmens.decision": "promoted" if promote else "kept",
                                            "rmens.reason": reason, "rmens.candidate_version": candidate_version,
                                            "rmens.champion_version": candidate_version if promote else str(current)})
        log_metrics(client, ctx.parent_run_id, {f"candidate_{k}": v for k, v in candidate.items()})
        if champion is not None:
            log_metrics(client, ctx.parent_run_id, {f"champion_{k}": v for k, v in champion.items()})
        create_markdown_artifact(key="rmens-retrain", description="champion decision", markdown=(
            f"# Retrain: {name}\n\n**{'Promoted' if promote else 'Kept the champion'}** — {reason}\n\n"
            f"| model | version | accuracy | ECE |\n|---|---|---|---|\n"
            f"| candidate | {candidate_version} | {candidate['accuracy']:.4f} | {candidate['ece']:.4f} |\n"
            + (f"| champion | {current} | {champion['accuracy']:.4f} | {champion['ece']:.4f} |\n"
               if champion is not None and current else "")))
    return {"promoted": promote, "reason": reason, "candidate_version": candidate_version,
            "champion_version": candidate_version if promote else current, "states": stage.states}
