"""Stage: draw N samples per prompt from the initial policy, once, for Best-of-n."""

from __future__ import annotations

from pathlib import Path

import mlflow

from rmens.config import BonConfig, PromptsConfig
from tasks.runtime.refs import ArtifactRef
from tasks.runtime.stage import run_stage, stage_task
from tasks.runtime.tracking import StageContext


@stage_task("sample", timeout_seconds=12 * 3600)
def sample(ctx: StageContext, policy: str, prompts: PromptsConfig, bon: BonConfig) -> ArtifactRef:
    def build(folder: Path, run_id: str) -> dict:
        from rmens.bon import draw_samples
        from rmens.data.prompts import load_prompts
        from rmens.models.backbone import load_policy, load_tokenizer

        texts = load_prompts(prompts)
        if bon.n_prompts:
            texts = texts[: bon.n_prompts]
        rows = draw_samples(load_policy(policy), load_tokenizer(policy, padding_side="left"), texts, bon, folder)
        mlflow.log_artifact(str(folder / "samples.jsonl"))
        return {"prompts": len(texts), "samples": len(rows), "n_samples": bon.n_samples,
                "mean_tokens": sum(r["n_tokens"] for r in rows) / len(rows),
                "finished_fraction": sum(r["finished"] for r in rows) / len(rows)}

    return run_stage(ctx, "sample", {"policy": policy, "prompts": prompts, "bon": bon}, build)
