"""Experiment steps that train: a reward model or ensemble per arm (and the gold judge), and the proxies'
optional gold labels and label noise."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from rmens.data.loaders import load_jsonl_pairs
from rmens.data.sources import model_paths
from rmens.data.splits import flip_labels
from rmens.experiment.data import PROXY_PAIRS
from rmens.experiment.measure import measure
from rmens.io import write_json, write_jsonl
from rmens.steps import Output, step
from rmens.steps.contract import granted_devices

if TYPE_CHECKING:  # types only: settings enter the step's key as values
    from rmens.models.config import EnsembleConfig
    from rmens.training.config import TrainConfig


@step("train", devices=1, memory_gib=4, shards=True, files={"ensemble": "ensemble"},
      reads=lambda ensemble, **_: model_paths(ensemble.backbone))
def train_step(folder: Path, *, pairs: Output, pairs_file: str, ensemble: EnsembleConfig, train: TrainConfig) -> dict:
    """One reward model or ensemble on the pairs of an earlier step; wall time and peak memory measured."""
    from rmens.training.launcher import train_on_devices

    training = load_jsonl_pairs(pairs.file(pairs_file))
    with measure() as cost:  # (of this process: sharded ranks report their own peaks in the result)
        result = train_on_devices(granted_devices(), ensemble, train, pairs.file(pairs_file), None, folder / "ensemble")
    trainable = sum(p.numel() for p in result.ensemble.parameters() if p.requires_grad)
    summary = {"pairs": len(training), "steps": sum(s.steps for s in result.stages.values()),
               "train_wall_s": cost["wall_s"], "train_peak_mib": cost["peak_mib"], "memory": cost["memory"],
               "train_peak_over_start_mib": cost["peak_mib"] - cost.get("rss_before_mib", 0.0),
               "param_mib": result.ensemble.parameter_bytes() / 2**20, "trainable_params": trainable,
               "device": str(next(result.ensemble.parameters()).device)}
    if result.ranks:  # sharded: the step's process only waited; its cost is the ranks'
        peak = max(r["peak_mib"] for r in result.ranks)
        summary.update(ranks=len(result.ranks), train_peak_mib=peak, train_peak_over_start_mib=peak,
                       memory=result.ranks[0]["memory"], device=f"{len(result.ranks)} FSDP2 ranks")
    write_json(folder / "train_summary.json", summary)
    return summary


@step("proxy_labels", devices=1, files={"proxy_pairs": PROXY_PAIRS})
def proxy_labels_step(folder: Path, *, pairs: Output, gold: Output | None, label_noise: float, seed: int) -> dict:
    """The proxies' pairs relabelled by the gold judge (the higher gold reward wins) and/or with a share of
    labels flipped (Coste et al.)."""
    from rmens.reward import EnsembleReward

    training = load_jsonl_pairs(pairs.file("proxy_pairs"))
    relabelled = 0
    if gold is not None:
        judge = EnsembleReward.from_folder(gold.file("ensemble"))
        prompts = [p.prompt for p in training]
        margin = (judge(prompts, [p.chosen for p in training]).scores
                  - judge(prompts, [p.rejected for p in training]).scores)
        relabelled = int((margin < 0).sum())
        training = [p if m >= 0 else dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen,
                                                         source={**p.source, "relabelled_by_gold": True})
                    for p, m in zip(training, margin.tolist())]
        training = [dataclasses.replace(p, weight=1.0) for p in training]  # the gold model's labels are firm
    training = flip_labels(training, label_noise, seed) if label_noise else training
    write_jsonl(folder / PROXY_PAIRS, (p.to_dict() for p in training))
    return {"pairs": len(training), "relabelled_by_gold": relabelled,
            "flipped": sum(bool(p.source.get("label_flipped")) for p in training)}


