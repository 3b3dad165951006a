"""Stage: make every model the run needs available locally (e.g. convert SmolLM2 from its GGUF once)."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.runtime.refs import ArtifactRef
from tasks.runtime.stage import run_stage, stage_task
from tasks.runtime.tracking import StageContext


@stage_task("prepare_models", timeout_seconds=3600)
def prepare_models(ctx: StageContext, names: list[str]) -> ArtifactRef:
    def build(folder: Path, run_id: str) -> dict:
        from rmens.models.backbone import resolve_model

        resolved = {name: resolve_model(name) for name in sorted(set(names))}
        (folder / "models.json").write_text(json.dumps(resolved, indent=2))
        return {"models": len(resolved)}

    return run_stage(ctx, "prepare_models", {"names": names}, build)
