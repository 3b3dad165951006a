"""Pipeline step: PPO of the policy against one ensemble arm under one aggregation rule, resumable."""

from __future__ import annotations

from pathlib import Path

from rmens.config import JudgeConfig, PPOConfig, PromptsConfig
from rmens.data.sources import model_paths, paths_read
from rmens.steps import Output, report_metrics, step


@step("ppo", resumable=True, devices=1, memory_gib=6,
      files={"run": "run", "policy": "run/policy", "history": "run/history.json"},
      reads=lambda ppo_cfg, prompts, judge_cfg=None, **_: model_paths(ppo_cfg.policy) + paths_read(prompts)
      + paths_read(judge_cfg))
def ppo(folder: Path, *, ppo_cfg: PPOConfig, reward: Output, prompts: PromptsConfig, label: str,
        judge_cfg: JudgeConfig | None = None, judge: Output | None = None) -> dict:
    """`label` names the run (arm and rule); a run that was stopped resumes from its last checkpoint."""
    from rmens.data.prompts import load_prompts
    from rmens.pipeline.judging import load_judge
    from rmens.ppo.trainer import PPOTrainer
    from rmens.reward import EnsembleReward

    reward_fn = EnsembleReward.from_folder(reward.file("ensemble"), ppo_cfg.aggregation)
    judge_fn = load_judge(judge_cfg, judge) if (judge_cfg is not None and ppo_cfg.judge_every) else None
    trainer = PPOTrainer(ppo_cfg, load_prompts(prompts), reward_fn, folder / "run", judge_fn=judge_fn,
                         reward_folder=reward.file("ensemble"), log_fn=report_metrics)
    result = trainer.train(resume=True)
    last = result.history[-1]
    return {"final_reward": last["reward"], "final_kl": last["kl"], "ppo_wall_s": result.wall_time,
            **({"final_judge": last["judge"]} if "judge" in last else {})}
