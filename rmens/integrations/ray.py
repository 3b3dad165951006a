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
    """EnsembleReward's interface, computed by an actor holding `devices` accelerators (0: one CPU).

    Inside a Ray task granted more devices than it uses itself (a PPO step asks for its own and its reward's, so
    that two PPO steps never each hold a device while waiting for the other's), the actor takes the last
    `devices` of the task's; elsewhere it asks Ray for its own."""

    def __init__(self, folder: str | Path, aggregation: AggregationConfig | None = None, devices: int = 1,
                 timeout_s: float = 900):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("a remote reward needs a running Ray: run with --ray (or ray.init() first)")
        # In the order the task's own cuda:0 is the first of (Ray's list of ids has no documented order)
        granted = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d] if ray.get_gpu_ids() else []
        if devices and len(granted) > devices:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # On the task's node (an actor asking for nothing would go anywhere), with the task's last devices
            options = {"num_gpus": 0, "num_cpus": 0,
                       "runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ",".join(granted[-devices:])}},
                       "scheduling_strategy": NodeAffinitySchedulingStrategy(
                           ray.get_runtime_context().get_node_id(), soft=False)}
        else:
            options = {"num_gpus": devices, "num_cpus": 0 if devices else 1}
        self.actor = ray.remote(**options)(_RewardActor).remote(str(folder),
                                                                (aggregation or AggregationConfig()).model_dump())
        try:  # also waits until the ensemble has loaded
            self.devices = ray.get(self.actor.devices.remote(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.kill(self.actor)
            gpus = ray.cluster_resources().get("GPU", 0)
            raise RuntimeError(f"the reward actor did not start within {timeout_s:g} s: no node had {devices} free "
                               f"device(s) for it (the cluster has {gpus:g})") from None

    def __call__(self, prompts: list[str], responses: list[str]) -> Rewards:
        import ray

        scores, members = ray.get(self.actor.score.remote(list(prompts), list(responses)))
        return Rewards(torch.tensor(scores), None if members is None else torch.tensor(members))

    def close(self) -> None:
        import ray

        ray.kill(self.actor)
