"""Experiment step of the RL half: PPO against one arm's reward under one rule, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rmens.data.sources import model_paths
from rmens.experiment.data import read_prompts
from rmens.experiment.measure import measure
from rmens.io import write_json
from rmens.steps import Output, step

if TYPE_CHECKING:  # types only: settings enter the step's key as values
    from rmens.ppo.config import PPOConfig


@step("ppo_run", resumable=True, devices=1, memory_gib=6, files={"run": "run"},
      reads=lambda ppo, **_: model_paths(ppo.policy))
def ppo_step(folder: Path, *, reward: Output, pairs: Output, ppo: PPOConfig) -> dict:
    """PPO of the policy against one arm's reward under one rule; resumes from its last checkpoint."""
    from rmens.generation import prompts_that_fit
    from rmens.ppo.trainer import PPOTrainer
    from rmens.reward import placed_reward

    prompts, too_long = prompts_that_fit(ppo.policy, read_prompts(pairs.file("ppo_prompts")),
                                         ppo.generation.max_new_tokens)
    with placed_reward(reward.file("ensemble"), ppo.aggregation, ppo.reward_devices) as reward_fn:
        trainer = PPOTrainer(ppo, prompts, reward_fn, folder / "run", reward_folder=reward.file("ensemble"))
        with measure() as cost:
            result = trainer.train(resume=True)
    last = result.history[-1]
    summary = {"train_prompts": len(prompts), "train_prompts_too_long": too_long, "steps": len(result.history),
               "final_reward": last["reward"], "final_kl": last["kl"],
               "final_response_length": last["response_length"], "ppo_wall_s": cost["wall_s"],
               "ppo_peak_mib": cost["peak_mib"]}
    write_json(folder / "ppo_summary.json", summary)
    return summary
