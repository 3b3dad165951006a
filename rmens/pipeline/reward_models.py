"""Pipeline steps: train a reward model or ensemble on prepared pairs, with its validation metrics; a full
ensemble as k member steps (which may run at once, on k devices) and the step that assembles them."""

from __future__ import annotations

import time
from pathlib import Path

from rmens.data.sources import model_paths
from rmens.io import write_json
from rmens.models.config import EnsembleConfig
from rmens.pipeline.data import read_pairs
from rmens.steps import Output, report_metrics, step
from rmens.steps.contract import granted_devices
from rmens.training.config import TrainConfig


@step("train_member", devices=1, memory_gib=4, shards=True, files={"member": "member"},
      reads=lambda ensemble, **_: model_paths(ensemble.backbone))
def train_member(folder: Path, *, data: Output, ensemble: EnsembleConfig, train_cfg: TrainConfig, member: int) -> dict:
    """Member `member` of the full ensemble `ensemble`, trained on its own (rmens.training.members); the
    validation pairs score it every train_cfg.eval_every steps."""
    from rmens.training.launcher import train_member_on_devices

    start = time.perf_counter()  # building, training and calibrating it, as train_ensemble's wall time counts
    trained = train_member_on_devices(granted_devices(), ensemble, train_cfg, member, data.file("train"),
                                      _val_file(data), folder / "member", log_fn=report_metrics)
    wall_s = time.perf_counter() - start
    return {"member": member, "steps": trained.stage.steps, "train_wall_s": wall_s,
            "param_mib": trained.model.parameter_bytes() / 2**20}


@step("train_ensemble", devices=1, memory_gib=4, shards=True,
      files={"ensemble": "ensemble", "val_metrics": "val_metrics.json"},
      reads=lambda ensemble, **_: model_paths(ensemble.backbone))
def train_ensemble(folder: Path, *, data: Output, ensemble: EnsembleConfig, train_cfg: TrainConfig, label: str,
                   members: list[Output] | None = None) -> dict:
    """`label` names the arm run ('linear-k3-r0', 'single-r1', 'gold') in the reliability diagram. Given
    `members` (the train_member outputs of a full ensemble, in order), it assembles them instead of training,
    and its train_wall_s adds theirs."""
    from rmens.evaluation.curves import reliability_diagram
    from rmens.evaluation.offline_judge import agreement_report
    from rmens.evaluation.rm_metrics import scalar_metrics
    from rmens.reward import EnsembleReward
    from rmens.training.launcher import train_on_devices
    from rmens.training.members import assemble, load_members

    val_pairs = read_pairs(data, "val")
    if members is None:  # sharded over its devices when it was given several
        result = train_on_devices(granted_devices(), ensemble, train_cfg, data.file("train"),
                                  data.file("val") if val_pairs else None, folder / "ensemble", log_fn=report_metrics)
    else:
        trained = load_members([member.require().file("member") for member in members])
        result = assemble(ensemble, train_cfg, trained, val_pairs, folder / "ensemble", log_fn=report_metrics)
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
    return {**metrics, "train_wall_s": result.wall_time + sum(m.summary["train_wall_s"] for m in members or []),
            "calibration_responses": result.ensemble.standardisation.responses, "steps": result.steps,
            "param_mib": result.ensemble.parameter_bytes() / 2**20}


def _val_file(data: Output) -> str | None:
    """The validation pairs' file, None when the split holds none (prepare_data's summary counts them)."""
    return data.file("val") if data.summary["n_val"] else None
