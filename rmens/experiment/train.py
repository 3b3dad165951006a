"""Experiment steps that train: a reward model or ensemble per arm (and the gold judge; a full ensemble as
its members, each on its own, then their assembly), and the proxies' optional gold labels and label noise."""

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


@step("member", devices=1, memory_gib=4, shards=True, files={"member": "member"},
      reads=lambda ensemble, **_: model_paths(ensemble.backbone))
def member_step(folder: Path, *, pairs: Output, pairs_file: str, ensemble: EnsembleConfig, train: TrainConfig,
                member: int) -> dict:
    """Member `member` of a full ensemble, trained on its own (rmens.training.members); wall time and peak
    memory measured."""
    from rmens.training.launcher import train_member_on_devices

    training = load_jsonl_pairs(pairs.file(pairs_file))
    with measure() as cost:
        trained = train_member_on_devices(granted_devices(), ensemble, train, member, pairs.file(pairs_file), None,
                                          folder / "member")
    return {"member": member, "pairs": len(training), "steps": trained.stage.steps, **_cost(cost, ranks=trained.ranks)}


@step("train", devices=1, memory_gib=4, shards=True, files={"ensemble": "ensemble"},
      reads=lambda ensemble, **_: model_paths(ensemble.backbone))
def train_step(folder: Path, *, pairs: Output, pairs_file: str, ensemble: EnsembleConfig, train: TrainConfig,
               members: list[Output] | None = None) -> dict:
    """One reward model or ensemble on the pairs of an earlier step; wall time and peak memory measured. Given
    `members` (the member outputs of a full ensemble, in order), it assembles them instead of training, and its
    cost is the whole training's: the members' wall times and its own summed, the largest peak."""
    from rmens.training.launcher import train_on_devices
    from rmens.training.members import assemble, load_members

    training = load_jsonl_pairs(pairs.file(pairs_file))
    with measure() as cost:  # (of this process: a sharded training's ranks report their own peaks)
        if members is None:
            result = train_on_devices(granted_devices(), ensemble, train, pairs.file(pairs_file), None,
                                      folder / "ensemble")
        else:
            trained = load_members([member.require().file("member") for member in members])
            result = assemble(ensemble, train, trained, output_dir=folder / "ensemble")
    trainable = sum(p.numel() for p in result.ensemble.parameters() if p.requires_grad)
    summary = {"pairs": len(training), "steps": result.steps,
               **_cost(cost, [m.summary for m in members or []], result.ranks),
               "param_mib": result.ensemble.parameter_bytes() / 2**20, "trainable_params": trainable,
               "device": f"{len(result.ranks)} FSDP2 ranks" if result.ranks else
               str(next(result.ensemble.parameters()).device)}
    write_json(folder / "train_summary.json", summary)
    return summary


def _cost(cost: dict, members: list[dict] | None = None, ranks: list[dict] | None = None) -> dict:
    """A training's wall time and peak memory (rmens.experiment.measure); an assembly's adds its members': what
    the full ensemble took one member after another, at the peak of the largest step. `ranks`: it was sharded,
    and its peak is its largest rank's (this process only waited for them)."""
    members = members or []
    peak, memory = cost["peak_mib"], cost["memory"]
    peak_over_start = peak - cost.get("rss_before_mib", 0.0)
    if ranks:  # a rank's peak is its whole process's: nothing ran in it before
        peak = peak_over_start = max(rank["peak_mib"] for rank in ranks)
        memory = ranks[0]["memory"]
    return {"train_wall_s": cost["wall_s"] + sum(m["train_wall_s"] for m in members),
            "train_peak_mib": max([peak, *(m["train_peak_mib"] for m in members)]), "memory": memory,
            "train_peak_over_start_mib": max([peak_over_start, *(m["train_peak_over_start_mib"] for m in members)]),
            **({"ranks": len(ranks)} if ranks else {})}


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


