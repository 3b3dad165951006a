"""Reward-model metrics on labelled pairs: accuracy, calibration, spread and disagreement.

Inputs are member margins ``[k, n] = r(chosen) - r(rejected)`` per member and each pair's target
(probability that `chosen` wins; 1.0 for a firm label). The ensemble margin is the mean member margin.
"""

from __future__ import annotations

import torch

from rmens.models.aggregate import member_std


def pairwise_accuracy(margins: torch.Tensor, targets: torch.Tensor | None = None) -> float:
    """Share of decided pairs whose margin has the label's sign; a zero margin counts one half.

    Draws (target 0.5) have no right answer and are left out.
    """
    targets = torch.ones_like(margins) if targets is None else targets
    decided = targets != 0.5
    if not bool(decided.any()):
        return float("nan")
    sign = torch.where(targets[decided] > 0.5, 1.0, -1.0)
    score = (torch.sign(margins[decided] * sign) + 1) / 2
    return float(score.mean())


def calibration(margins: torch.Tensor, targets: torch.Tensor | None = None, bins: int = 10) -> dict:
    """Expected calibration error of sigmoid(margin) with equal-width bins, and the reliability table.

    Each pair counts twice, as (p, y) and (1 - p, 1 - y), so the measure does not depend on which
    response is listed first.
    """
    targets = torch.ones_like(margins) if targets is None else targets
    p = torch.sigmoid(margins.double())
    probs = torch.cat([p, 1 - p])
    outcomes = torch.cat([targets.double(), 1 - targets.double()])
    index = torch.clamp((probs * bins).long(), max=bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        in_bin = index == b
        count = int(in_bin.sum())
        if count:
            conf, acc = float(probs[in_bin].mean()), float(outcomes[in_bin].mean())
            ece += count / len(probs) * abs(conf - acc)
            table.append({"bin_low": b / bins, "bin_high": (b + 1) / bins, "confidence": conf,
                          "accuracy": acc, "count": count})
    return {"ece": ece, "reliability": table}


def disagreement_buckets(member_margins: torch.Tensor, targets: torch.Tensor | None = None,
                         buckets: int = 4) -> list[dict]:
    """Ensemble accuracy by quantile bucket of member disagreement (std of the member margins)."""
    k, n = member_margins.shape
    targets = torch.ones(n) if targets is None else targets
    spread = member_std(member_margins)
    ensemble = member_margins.mean(dim=0)
    order = torch.argsort(spread, stable=True)
    out = []
    for b, chunk in enumerate(torch.tensor_split(order, buckets)):
        if len(chunk) == 0:
            continue
        out.append({"bucket": b, "std_low": float(spread[chunk].min()), "std_high": float(spread[chunk].max()),
                    "accuracy": pairwise_accuracy(ensemble[chunk], targets[chunk]), "count": len(chunk)})
    return out


def ensemble_metrics(member_margins: torch.Tensor, targets: torch.Tensor | None = None,
                     member_chosen: torch.Tensor | None = None, bins: int = 10, buckets: int = 4) -> dict:
    """All pair metrics for an ensemble: per-member and ensemble accuracy, ECE, spread, buckets."""
    member_margins = member_margins.float()
    ensemble = member_margins.mean(dim=0)
    cal = calibration(ensemble, targets, bins)
    out = {
        "accuracy": pairwise_accuracy(ensemble, targets),
        "member_accuracy": [pairwise_accuracy(m, targets) for m in member_margins],
        "ece": cal["ece"],
        "member_ece": [calibration(m, targets, bins)["ece"] for m in member_margins],
        "reliability": cal["reliability"],
        "margin_std": float(member_std(member_margins).mean()),
        "disagreement": disagreement_buckets(member_margins, targets, buckets),
        "n_pairs": int(member_margins.shape[1]),
    }
    out["member_accuracy_mean"] = sum(out["member_accuracy"]) / len(out["member_accuracy"])
    if member_chosen is not None:
        out["reward_std"] = float(member_std(member_chosen.float()).mean())
    return out


def scalar_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The scalar part of `ensemble_metrics`, flattened for logging (member lists become m0, m1...)."""
    out: dict[str, float] = {}
    for key in ("accuracy", "ece", "margin_std", "member_accuracy_mean", "reward_std"):
        if key in metrics:
            out[f"{prefix}{key}"] = float(metrics[key])
    for i, value in enumerate(metrics.get("member_accuracy", [])):
        out[f"{prefix}accuracy_m{i}"] = float(value)
    for bucket in metrics.get("disagreement", []):
        out[f"{prefix}accuracy_disagreement_q{bucket['bucket']}"] = float(bucket["accuracy"])
    return out


def length_metrics(margins: torch.Tensor, len_chosen: torch.Tensor, len_rejected: torch.Tensor) -> dict:
    """Accuracy where the longer response lost, next to the "longer wins" rule on the same pairs.

    Preference data such as AlpacaEval's GPT-4 verdicts favour the longer response 84-91% of the time,
    so overall accuracy alone cannot tell a reward model from a length detector. `margins` are the
    (ensemble) margins r(chosen) - r(rejected) [n]; lengths in any unit.
    """
    longer_lost = len_chosen < len_rejected
    return {
        "n_longer_lost": int(longer_lost.sum()),
        "accuracy_longer_lost": pairwise_accuracy(margins[longer_lost]) if bool(longer_lost.any()) else float("nan"),
        "length_rule_accuracy": pairwise_accuracy((len_chosen - len_rejected).double()),
    }
