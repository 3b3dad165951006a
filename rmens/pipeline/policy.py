"""Pipeline step: PPO of the policy against one arm run's reward under one aggregation rule, resumable."""

from __future__ import annotations

from pathlib import Path

from rmens.data.config import PromptsConfig
from rmens.data.sources import model_paths, paths_read
from rmens.pipeline.config import GoldConfig
from rmens.pipeline.gold import gold_paths
from rmens.ppo.config import PPOConfig
from rmens.steps import Output, report_metrics, step


@step("ppo", resumable=True, devices=1, memory_gib=6,
      files={"run": "run", "policy": "run/policy", "history": "run/history.json"},
      reads=lambda ppo_cfg, prompts, gold_cfg=None, **_: model_paths(ppo_cfg.policy) + paths_read(prompts)
      + gold_paths(gold_cfg))
def ppo(folder: Path, *, ppo_cfg: PPOConfig, reward: Output, prompts: PromptsConfig, label: str,
        gold_cfg: GoldConfig | None = None, gold: Output | None = None) -> dict:
    """`label` names the run (arm, rule and run); a run that was stopped resumes from its last checkpoint. With
    ppo_cfg.gold_every set, the gold scores the rollouts as it goes."""
    from rmens.data.prompts import load_prompts
    from rmens.pipeline.gold import load_gold
    from rmens.ppo.trainer import PPOTrainer
    from rmens.reward import placed_reward

    gold_fn = load_gold(gold_cfg, gold) if (gold_cfg is not None and ppo_cfg.gold_every) else None
    with placed_reward(reward.file("ensemble"), ppo_cfg.aggregation, ppo_cfg.reward_devices) as reward_fn:
        trainer = PPOTrainer(ppo_cfg, load_prompts(prompts), reward_fn, folder / "run", gold_fn=gold_fn,
                             reward_folder=reward.file("ensemble"), log_fn=report_metrics)
        result = trainer.train(resume=True)
    last = result.history[-1]
    return {"final_reward": last["reward"], "final_kl": last["kl"], "ppo_wall_s": result.wall_time,
            **({"final_gold": last["gold"]} if "gold" in last else {})}
