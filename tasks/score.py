"""Stage: score stored samples with one scorer (an ensemble's members, or the judge), never regenerating."""

from __future__ import annotations

from pathlib import Path

from rmens.config import JudgeConfig
from tasks.runtime.judging import load_judge
from tasks.runtime.refs import ArtifactRef
from tasks.runtime.stage import run_stage, stage_task
from tasks.runtime.tracking import StageContext


@stage_task("score", timeout_seconds=12 * 3600)
def score(ctx: StageContext, samples: ArtifactRef, scorer: ArtifactRef | None, name: str,
          judge: JudgeConfig | None = None) -> ArtifactRef:
    """An ensemble artifact scores with all its members; with `judge` set, the judge scores instead."""

    def build(folder: Path, run_id: str) -> dict:
        from rmens.bon import score_samples
        from rmens.reward import EnsembleReward

        fn = load_judge(judge, scorer) if judge is not None else EnsembleReward.from_folder(scorer.folder / "ensemble")
        paths = score_samples(samples.require().folder, {name: fn}, scores_dir=folder)
        return {"scored": sum(1 for _ in paths[name].open())}

    return run_stage(ctx, "score", {"samples": samples, "scorer": scorer, "name": name, "judge": judge}, build)
