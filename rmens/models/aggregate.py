"""Aggregation rules: member rewards [k, batch] -> one reward per example [batch].

Pure functions; the spread is the population standard deviation over members (ddof = 0), so a
single-member "ensemble" has zero spread and every rule reduces to its one reward.

- mean: the average member reward (Zhang et al.'s main rule);
- min: worst case over members (WCO, Coste et al.);
- lcb: mean - beta * std, a lower confidence bound (Zhang et al., App. B);
- uwo: mean - lam * var, uncertainty-weighted optimisation (Coste et al.).
"""

from __future__ import annotations

from typing import get_args

import torch

from rmens.models.config import AggregationConfig, Rule

RULES: tuple[str, ...] = get_args(Rule)  # the names live once, in the config's type


def member_std(member_rewards: torch.Tensor) -> torch.Tensor:
    """The members' spread per example [batch]: the one definition every metric and rule uses."""
    return member_rewards.std(dim=0, unbiased=False)


def aggregate(member_rewards: torch.Tensor, rule: str = "mean", *, beta: float = 1.0, lam: float = 0.5) -> torch.Tensor:
    """Combine [k, batch] member rewards into [batch] rewards with `rule`."""
    if member_rewards.dim() != 2:
        raise ValueError(f"member rewards must be [k, batch], got shape {tuple(member_rewards.shape)}")
    if not torch.isfinite(member_rewards).all():
        bad = (~torch.isfinite(member_rewards)).nonzero()[0].tolist()
        raise ValueError(f"non-finite member reward (member {bad[0]}, example {bad[1]})")
    mean = member_rewards.mean(dim=0)
    if rule == "mean":
        return mean
    if rule == "min":
        return member_rewards.min(dim=0).values
    if rule == "lcb":
        return mean - beta * member_std(member_rewards)
    if rule == "uwo":
        return mean - lam * member_rewards.var(dim=0, unbiased=False)
    raise ValueError(f"unknown aggregation rule {rule!r}; choose from {', '.join(RULES)}")


def aggregate_with(member_rewards: torch.Tensor, config: AggregationConfig) -> torch.Tensor:
    return aggregate(member_rewards, config.rule, beta=config.beta, lam=config.lam)
