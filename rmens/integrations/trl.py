"""An ensemble's reward as a TRL reward function, for `GRPOTrainer(reward_funcs=[...])` and `RLOOTrainer`.

    from rmens.integrations.trl import ensemble_reward_func
    trainer = GRPOTrainer(model=..., reward_funcs=[ensemble_reward_func("my-ensemble", rule="lcb1")], ...)

TRL calls it with the batch's prompts and completions (text, or conversations as lists of messages) and
logs the returned rewards under the function's name (`rewards/rmens_lcb1/mean`); the members' spread and
each member's mean go through TRL's `log_metric` hook as `rmens/member_std`, `rmens/member_<i>`. TRL is not
imported: this is a plain callable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rmens.models.config import AggregationConfig


def _text(item: Any) -> str:
    """A completion's text: the string itself, or the content of a conversation's last message."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[-1], dict) and "content" in item[-1]:
        return str(item[-1]["content"])
    raise ValueError(f"a completion must be text or a list of messages, got {type(item).__name__}")


def _prompt(item: Any) -> Any:
    """A prompt as rmens reads it: text, or a conversation (a list of role/content messages)."""
    if isinstance(item, str) or (isinstance(item, list) and all(isinstance(m, dict) for m in item)):
        return item
    raise ValueError(f"a prompt must be text or a list of messages, got {type(item).__name__}")


def ensemble_reward_func(ensemble: str | Path | Any, rule: str | AggregationConfig = "mean",
                         batch_size: int = 16) -> Callable[..., list[float]]:
    """A TRL reward function from a saved ensemble folder under `rule` (mean, min, lcb<beta>, uwo<lam>, or an
    AggregationConfig), or from an rmens.reward.EnsembleReward, which keeps its own rule."""
    from rmens.reward import EnsembleReward

    if isinstance(ensemble, EnsembleReward):
        reward = ensemble
    else:
        aggregation = AggregationConfig.from_name(rule) if isinstance(rule, str) else rule
        reward = EnsembleReward.from_folder(ensemble, aggregation, batch_size=batch_size)
    aggregation = reward.aggregation

    def rmens_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        result = reward([_prompt(p) for p in prompts], [_text(c) for c in completions]).check(
            len(completions), "rmens TRL reward")
        log_metric = kwargs.get("log_metric")
        if log_metric is not None and result.members is not None:
            log_metric("rmens/member_std", float(result.members.std(dim=0, unbiased=False).mean()))
            for i, member in enumerate(result.members):
                log_metric(f"rmens/member_{i}", float(member.mean()))
        return result.scores.tolist()

    rmens_reward.__name__ = f"rmens_{aggregation.name}"  # TRL logs rewards/<name>/mean and /std
    return rmens_reward
