import math

import pytest
import torch

from rmens.evaluation.rm_metrics import calibration, disagreement_buckets, ensemble_metrics, pairwise_accuracy
from rmens.models.aggregate import aggregate
from rmens.models.config import AggregationConfig

# Two examples, three members. Column 0: 1, 2, 6 -> mean 3, var (4+1+9)/3 = 14/3. Column 1: all 2.
R = torch.tensor([[1.0, 2.0], [2.0, 2.0], [6.0, 2.0]])


def test_rules_against_hand_computed_values():
    std0 = math.sqrt(14 / 3)
    torch.testing.assert_close(aggregate(R, "mean"), torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(aggregate(R, "min"), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(aggregate(R, "lcb", beta=0.5), torch.tensor([3.0 - 0.5 * std0, 2.0]))
    torch.testing.assert_close(aggregate(R, "uwo", lam=0.5), torch.tensor([3.0 - 0.5 * 14 / 3, 2.0]))
    torch.testing.assert_close(aggregate(R[:1], "lcb", beta=3.0), R[0])  # one member: no spread


def test_rule_errors():
    with pytest.raises(ValueError, match="unknown aggregation rule 'median'"):
        aggregate(R, "median")
    with pytest.raises(ValueError, match=r"\[k, batch\]"):
        aggregate(R[0], "mean")
    bad = R.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="member 2, example 1"):
        aggregate(bad, "mean")
    assert AggregationConfig(rule="lcb", beta=2).name == "lcb2"
    with pytest.raises(ValueError):
        AggregationConfig(rule="lcb", beta=-1)


def test_pairwise_accuracy_counts_ties_half_and_skips_draws():
    margins = torch.tensor([1.0, -1.0, 0.0, 2.0, 5.0])
    targets = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.9])
    assert pairwise_accuracy(margins, targets) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert pairwise_accuracy(torch.tensor([-1.0]), torch.tensor([0.0])) == 1.0


def test_ece_against_hand_computed_value():
    # sigmoid(0) = 0.5 and sigmoid(ln 3) = 0.75; both pairs labelled 'chosen wins'.
    margins = torch.tensor([0.0, math.log(3.0)])
    result = calibration(margins, bins=10)
    # Points (p, y): (0.5,1) (0.75,1) and mirrored (0.5,0) (0.25,0).
    # Bin [0.2,0.3): conf 0.25, acc 0 -> |0.25|; bin [0.5,0.6): conf 0.5, acc 0.5 -> 0; bin [0.7,0.8): 0.25.
    assert result["ece"] == pytest.approx((1 * 0.25 + 2 * 0 + 1 * 0.25) / 4)
    assert [row["count"] for row in result["reliability"]] == [1, 2, 1]


def test_disagreement_buckets_and_ensemble_metrics():
    member_margins = torch.tensor([[1.0, 1.0, 3.0, -3.0], [1.0, 1.0, -1.0, 1.0]])
    buckets = disagreement_buckets(member_margins, buckets=2)
    assert [b["count"] for b in buckets] == [2, 2]
    assert buckets[0]["accuracy"] == 1.0 and buckets[1]["accuracy"] == 0.5  # means 1,1 | 1,-1
    metrics = ensemble_metrics(member_margins)
    assert metrics["member_accuracy"] == [0.75, 0.75]
    assert metrics["accuracy"] == 0.75
    assert metrics["margin_std"] == pytest.approx((0 + 0 + 2 + 2) / 4)
