"""Scheduled retraining: retrain on the current data, evaluate on held-out pairs, and move the registered
model's champion aliases only when the new model beats the current champion; otherwise keep them and say why.

Registry aliases (README, "Deploying"): every version retrain registers gets `candidate_alias` (the newest,
promoted or not); `champion_alias` and the run's `label` (e.g. `nightly`) move only to a promoted version, so a
consumer loading either never gets a rejected candidate. Each candidate is decided once: of two runs started
together, which reuse one trained and registered version, one records the decision and the other says that
it was already made, and by which run."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.entry import entry_point
from rmens.pipeline.config import RetrainConfig
from rmens.pipeline.data import read_pairs
from rmens.pipeline.plan import train_one
from rmens.preflight import check_before_work
from tasks.registry import decide_once
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.stager import Stager, flow_run_name, flow_run_tags
from tasks.runtime.tracking import client_for, log_metrics, parent_run, set_tags


@flow(name="rmens-retrain", flow_run_name=flow_run_name("retrain"), validate_parameters=False)
@entry_point
def retrain(config: RetrainConfig = RetrainConfig(), refresh: bool = False) -> dict:
    check_before_work(config)
    paths = ProjectPaths.at(config.project_dir).make()
    with parent_run(paths, f"retrain:{config.label}", config, tags=flow_run_tags()) as ctx, \
            Stager(ctx, refresh, config.log_model, config.registered_model,
                   model_aliases=[config.candidate_alias]) as stage:
        data, model = train_one(stage, config)
        held_out = read_pairs(data, "val")
        if not held_out:
            raise ValueError("retrain needs held-out pairs: set data.val_fraction > 0")
        decision, decided_here = decide_once(
            paths, config.registered_model, [config.champion_alias, config.label],
            str(model.summary["model_version"]), held_out, config.metric, config.min_improvement, ctx.parent_run_id)
        if decided_here:
            outcome = "promoted" if decision.promote else "kept"
            reason = decision.reason
        else:  # the same version, decided by an earlier or a concurrent run: this one changed nothing
            outcome = "already-decided"
            reason = (f"version {decision.candidate_version} was decided by run {decision.decided_by} "
                      f"({'promoted' if decision.promote else 'kept'}): {decision.reason}")
        client = client_for(ctx)
        set_tags(client, ctx.parent_run_id, {
            "rmens.decision": outcome, "rmens.reason": reason,
            "rmens.candidate_version": decision.candidate_version,
            "rmens.champion_version": str(decision.champion_after)})
        log_metrics(client, ctx.parent_run_id, {f"candidate_{k}": v for k, v in decision.candidate.items()})
        if decision.champion is not None:
            log_metrics(client, ctx.parent_run_id, {f"champion_{k}": v for k, v in decision.champion.items()})
        create_markdown_artifact(key="rmens-retrain", description="champion decision",
                                 markdown=decision.markdown(config.registered_model, outcome))
    return {"promoted": decided_here and decision.promote, "decision": outcome, "reason": reason,
            "candidate_version": decision.candidate_version, "champion_version": decision.champion_after,
            "states": stage.states}
