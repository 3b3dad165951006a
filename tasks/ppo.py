"""Stage: PPO of the policy against one ensemble arm with one aggregation rule."""

from __future__ import annotations

from pathlib import Path

import mlflow

from rmens.config import JudgeConfig, PPOConfig, PromptsConfig
from tasks.runtime.judging import load_judge
from tasks.runtime.refs import ArtifactRef
from tasks.runtime.stage import run_stage, stage_task
from tasks.runtime.tracking import StageContext, client_for, log_metrics


@stage_task("ppo", timeout_seconds=24 * 3600)
def ppo(ctx: StageContext, ppo_cfg: PPOConfig, reward: ArtifactRef, prompts: PromptsConfig, label: str,
        judge_cfg: JudgeConfig | None = None, judge: ArtifactRef | None = None) -> ArtifactRef:
    def build(folder: Path, run_id: str) -> dict:
        from rmens.data.prompts import load_prompts
        from rmens.ppo.trainer import PPOTrainer
        from rmens.reward import EnsembleReward

        client = client_for(ctx)
        # arm, kind, k and rule come as tags from the flow (the stage context); the rule is also a param
        reward_fn = EnsembleReward.from_folder(reward.require().folder / "ensemble", ppo_cfg.aggregation)
        judge_fn = load_judge(judge_cfg, judge) if (judge_cfg is not None and ppo_cfg.judge_every) else None
        trainer = PPOTrainer(ppo_cfg, load_prompts(prompts), reward_fn, folder / "run", judge_fn=judge_fn,
                             reward_folder=reward.folder / "ensemble",
                             log_fn=lambda step, stats: log_metrics(client, run_id, stats, step))
        result = trainer.train(resume=True)  # a retried task resumes from its last checkpoint
        mlflow.log_artifact(str(folder / "run" / "history.json"))
        last = result.history[-1]
        return {"final_reward": last["reward"], "final_kl": last["kl"], "ppo_wall_s": result.wall_time,
                **({"final_judge": last["judge"]} if "judge" in last else {})}

    return run_stage(ctx, "ppo", {"ppo_cfg": ppo_cfg, "reward": reward, "prompts": prompts, "label": label,
                                 "judge_cfg": judge_cfg, "judge": judge}, build, resume=True)
