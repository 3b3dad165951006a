"""Stage: train a reward ensemble on prepared pairs; log curves, metrics and the model to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from rmens.config import AggregationConfig, EnsembleConfig, TrainConfig
from tasks.prepare_data import read_pairs
from tasks.runtime.refs import ArtifactRef
from tasks.runtime.stage import run_stage, stage_task
from tasks.runtime.tracking import StageContext, client_for, log_metrics, set_tags


@stage_task("train_ensemble", timeout_seconds=12 * 3600)
def train_ensemble(ctx: StageContext, data: ArtifactRef, ensemble: EnsembleConfig, train_cfg: TrainConfig,
                   label: str, registered_model: str | None = None, log_model: bool = True) -> ArtifactRef:
    """`label` names the arm ('linear-k3', 'single-s0', 'judge'); it is also the model alias."""

    def build(folder: Path, run_id: str) -> dict:
        from rmens.evaluation.curves import reliability_diagram
        from rmens.evaluation.offline_judge import agreement_report
        from rmens.evaluation.rm_metrics import scalar_metrics
        from rmens.reward import EnsembleReward
        from rmens.training.trainer import train_ensemble as train

        client = client_for(ctx)
        set_tags(client, run_id, {"rmens.arm": label, "rmens.kind": ensemble.kind, "rmens.k": str(ensemble.k)})
        train_pairs, val_pairs = read_pairs(data, "train"), read_pairs(data, "val")
        result = train(ensemble, train_cfg, train_pairs, val_pairs, folder / "ensemble",
                       log_fn=lambda step, metrics: log_metrics(client, run_id, metrics, step))
        metrics = scalar_metrics(result.metrics, "val_")
        (folder / "val_metrics.json").write_text(json.dumps(result.metrics, indent=2))
        if result.metrics:
            reliability_diagram(result.metrics["reliability"], folder / "reliability.png",
                                f"{label}: ECE {result.metrics['ece']:.3f}")
            mlflow.log_artifact(str(folder / "reliability.png"))
        mlflow.log_artifact(str(folder / "val_metrics.json"))
        mlflow.log_artifact(str(folder / "ensemble" / "ensemble.json"))
        if val_pairs:  # length bias: agreement where the longer response lost, next to the length rule
            # Raw scores, as the val_accuracy beside it: an accuracy of the model on labelled pairs.
            reward = EnsembleReward.from_folder(folder / "ensemble")
            report = agreement_report(lambda p, r: reward(p, r, standardise=False), val_pairs)
            metrics.update({f"val_{k}": v for k, v in report.items()})
        summary = {**metrics, "train_wall_s": result.wall_time,
                   "calibration_responses": result.ensemble.standardisation.responses,
                   "steps": sum(s.steps for s in result.stages.values()),
                   "param_mib": result.ensemble.parameter_bytes() / 2**20}
        if log_model:
            from tasks.runtime.mlflow_model import log_and_register

            uri, version = log_and_register(str(folder / "ensemble"), registered_model, [label],
                                            AggregationConfig().model_dump())
            set_tags(client, run_id, {"rmens.model_uri": uri, "rmens.model_version": str(version)})
            summary["model_version"] = str(version or "")  # an id, not a measurement: text, so not a metric
        return summary

    return run_stage(ctx, "train_ensemble", {"data": data, "ensemble": ensemble, "train_cfg": train_cfg,
                                            "label": label, "registered_model": registered_model,
                                            "log_model": log_model}, build)
