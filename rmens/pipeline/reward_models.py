"""Pipeline step: train a reward model or ensemble on prepared pairs, with its validation metrics."""

from __future__ import annotations

from pathlib import Path

from rmens.data.sources import model_paths
from rmens.io import write_json
from rmens.models.config import EnsembleConfig
from rmens.pipeline.data import read_pairs
from rmens.steps import Output, report_metrics, step
from rmens.steps.contract import granted_devices
from rmens.training.config import TrainConfig


@step("train_ensemble", devices=1, memory_gib=4, shards=True,
      files={"ensemble": "ensemble", "val_metrics": "val_metrics.json"},
      reads=lambda ensemble, **_: model_paths(ensemble.backbone))
def train_ensemble(folder: Path, *, data: Output, ensemble: EnsembleConfig, train_cfg: TrainConfig, label: str) -> dict:
    """`label` names the arm run ('linear-k3-r0', 'single-r1', 'gold') in the reliability diagram."""
    from rmens.evaluation.curves import reliability_diagram
    from rmens.evaluation.offline_judge import agreement_report
    from rmens.evaluation.rm_metrics import scalar_metrics
    from rmens.reward import EnsembleReward
    from rmens.training.launcher import train_on_devices

    val_pairs = read_pairs(data, "val")
    result = train_on_devices(granted_devices(), ensemble, train_cfg, data.file("train"),
                              data.file("val") if val_pairs else None, folder / "ensemble", log_fn=report_metrics)
    metrics = scalar_metrics(result.metrics, "val_")
    write_json(folder / "val_metrics.json", result.metrics)
    if result.metrics:
        reliability_diagram(result.metrics["reliability"], folder / "reliability.png",
                            f"{label}: ECE {result.metrics['ece']:.3f}")
    if val_pairs:  # length bias: agreement where the longer response lost, next to the length rule
        # Raw scores, as the val_accuracy beside it: an accuracy of the model on labelled pairs.
        reward = EnsembleReward.from_folder(folder / "ensemble")
        report = agreement_report(lambda p, r: reward(p, r, standardise=False), val_pairs)
        metrics.update({f"val_{k}": v for k, v in report.items()})
    return {**metrics, "train_wall_s": result.wall_time,
            "calibration_responses": result.ensemble.standardisation.responses,
            "steps": sum(s.steps for s in result.stages.values()),
            "param_mib": result.ensemble.parameter_bytes() / 2**20}
