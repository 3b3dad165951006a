"""Reward-model metrics of a saved ensemble on any labelled pair set, with a reliability diagram."""

from __future__ import annotations

from pathlib import Path

import torch

from rmens.data.schema import PreferencePair, validate_pairs
from rmens.evaluation.curves import reliability_diagram
from rmens.evaluation.rm_metrics import ensemble_metrics, length_metrics
from rmens.io import write_json
from rmens.reward import EnsembleReward


def evaluate_reward_model(reward: EnsembleReward | str | Path, pairs: list[PreferencePair],
                          out_dir: str | Path | None = None, name: str = "ensemble") -> dict:
    """Accuracy (also where the longer response lost, next to the length rule), ECE, per-member spread and
    accuracy by disagreement bucket; JSON and PNG in out_dir.

    On the members' raw scores: ECE reads sigmoid(margin) as a probability, which holds on the
    Bradley-Terry scale the members were trained on and not after standardising rescales the margin; the
    metrics thus match the ones training reports. (A member's own accuracy is the same either way.)
    """
    validate_pairs(pairs, "evaluation pairs")
    if not isinstance(reward, EnsembleReward):
        reward = EnsembleReward.from_folder(reward, allow_unstandardised=True)  # raw scores need no statistics
    prompts = [p.prompt for p in pairs]
    chosen = reward.member_scores(prompts, [p.chosen for p in pairs], standardise=False)
    rejected = reward.member_scores(prompts, [p.rejected for p in pairs], standardise=False)
    targets = torch.tensor([p.weight for p in pairs])
    metrics = ensemble_metrics(chosen - rejected, targets, member_chosen=chosen)
    # Length stays visible: accuracy where the longer response lost, next to "the longer wins".
    metrics.update(length_metrics((chosen - rejected).mean(dim=0), torch.tensor([len(p.chosen) for p in pairs]),
                                  torch.tensor([len(p.rejected) for p in pairs])))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "rm_metrics.json", metrics)
        reliability_diagram(metrics["reliability"], out / "reliability.png",
                            f"{name}: ECE {metrics['ece']:.3f}, accuracy {metrics['accuracy']:.3f}")
    return metrics
