"""A reward ensemble on devices of its own, as a Ray actor behind the reward-function interface
(prompts, responses -> Rewards): PPO puts its reward beside the policy's process rather than in it, as
OpenRLHF gives each role its own placement, and the trainer does not change.

    reward = RemoteReward(folder, AggregationConfig(rule="lcb", beta=1.0), devices=1)
    trainer = PPOTrainer(cfg, prompts, reward, ...)

Needs a running Ray (the steps of `rmens run --ray` run inside one); ray is imported only here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rmens.models.config import AggregationConfig
from rmens.reward import Rewards


class _RewardActor:
    """Holds the ensemble in the actor's process, on the devices Ray granted it."""

    def __init__(self, folder: str, aggregation: dict):
        from rmens.reward import EnsembleReward

        self.reward = EnsembleReward.from_folder(folder, AggregationConfig.model_validate(aggregation))

    def devices(self) -> str:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")

    def score(self, prompts: list[str], responses: list[str]) -> tuple[list[float], list[list[float]] | None]:
        rewards = self.reward(prompts, responses)
        return rewards.scores.tolist(), None if rewards.members is None else rewards.members.tolist()


class RemoteReward:
    """EnsembleReward's interface, computed by an actor holding `devices` accelerators (0: one CPU)."""

    def __init__(self, folder: str | Path, aggregation: AggregationConfig | None = None, devices: int = 1):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("a remote reward needs a running Ray: run with --ray (or ray.init() first)")
        actor = ray.remote(num_gpus=devices, num_cpus=0 if devices else 1)(_RewardActor)
        self.actor = actor.remote(str(folder), (aggregation or AggregationConfig()).model_dump())
        self.devices = ray.get(self.actor.devices.remote())  # also waits until the ensemble has loaded

    def __call__(self, prompts: list[str], responses: list[str]) -> Rewards:
        import ray

        scores, members = ray.get(self.actor.score.remote(list(prompts), list(responses)))
        return Rewards(torch.tensor(scores), None if members is None else torch.tensor(members))

    def close(self) -> None:
        import ray

        ray.kill(self.actor)
