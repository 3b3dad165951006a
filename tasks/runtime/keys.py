"""Cache keys: the stage's config, the content hashes of its inputs, and a fingerprint of its code.

Prefect's TASK_SOURCE policy hashes only a task's own source text, not the helpers it calls, so the
fingerprint here hashes the source files of every module that computes the stage.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from rmens.experiment.plan import STEP_CODE
from rmens.fingerprint import canonical, digest, source_fingerprint
from tasks.runtime.refs import ArtifactRef

# Modules whose source decides each stage's output.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "prepare_data": ("rmens.data",),
    "prepare_models": ("rmens.models.backbone",),
    "train_ensemble": ("rmens.training", "rmens.models", "rmens.data", "rmens.evaluation.rm_metrics", "rmens.reward"),
    "sample": ("rmens.generation", "rmens.bon", "rmens.data.encoding", "rmens.data.prompts"),
    "score": ("rmens.bon", "rmens.reward", "rmens.models", "rmens.evaluation.judges", "rmens.data.encoding",
              "tasks.runtime.judging"),
    "best_of_n": ("rmens.bon", "rmens.models.aggregate", "rmens.evaluation.curves"),
    "ppo": ("rmens.ppo", "rmens.generation", "rmens.reward", "rmens.models", "rmens.data"),
    "evaluate": ("rmens.evaluation", "rmens.generation", "rmens.reward", "rmens.models", "rmens.data",
                 "tasks.runtime.judging"),
    "report": ("rmens.evaluation.overlay",),
}


def experiment_stage(step: str) -> str:
    """The stage (task) name of a reference-experiment step (rmens.experiment.plan)."""
    return f"experiment_{step}"


STAGE_CODE.update({experiment_stage(step): modules + ("tasks.experiment",) for step, modules in STEP_CODE.items()})


@functools.cache  # per process, as source_fingerprint is: a stage key is computed on every stage call
def code_fingerprint(stage: str) -> str:
    """The stage's library modules and its task module (tasks/<stage>.py, where it has one of its own)."""
    own = (f"tasks.{stage}",) if importlib.util.find_spec(f"tasks.{stage}") else ()
    return source_fingerprint(STAGE_CODE[stage] + own)


def _identify(value: Any) -> Any:
    return {"ref": value.stage, "sha256": value.sha256} if isinstance(value, ArtifactRef) else None


def stage_key(stage: str, params: dict[str, Any]) -> str:
    """Key of a stage run: params (configs and upstream refs by content hash) plus its code fingerprint.
    The `ctx` parameter (tracking ids, paths) is left out except for the project folder."""
    semantic = {k: v for k, v in params.items() if k != "ctx"}
    if "ctx" in params:
        semantic["project"] = str(params["ctx"].project_dir)
    return digest({"stage": stage, "params": canonical(semantic, _identify), "code": code_fingerprint(stage)})
