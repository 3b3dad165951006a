"""Cache keys: the stage's config, the content hashes of its inputs, and a fingerprint of its code.

Prefect's TASK_SOURCE policy hashes only a task's own source text, not the helpers it calls, so the
fingerprint here hashes the source files of every module that computes the stage.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.refs import ArtifactRef

# Modules whose source decides each stage's output.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "prepare_data": ("rmens.data",),
    "prepare_models": ("rmens.models.backbone",),
    "train_ensemble": ("rmens.training", "rmens.models", "rmens.data", "rmens.evaluation.rm_metrics"),
    "sample": ("rmens.generation", "rmens.bon", "rmens.data.encoding", "rmens.data.prompts"),
    "score": ("rmens.bon", "rmens.reward", "rmens.models", "rmens.evaluation.judges", "rmens.data.encoding",
              "tasks.judging"),
    "best_of_n": ("rmens.bon", "rmens.models.aggregate", "rmens.evaluation.curves"),
    "ppo": ("rmens.ppo", "rmens.generation", "rmens.reward", "rmens.models", "rmens.data"),
    "evaluate": ("rmens.evaluation", "rmens.generation", "rmens.reward", "rmens.models", "rmens.data",
                 "tasks.judging"),
    "report": (),
}


def _module_files(name: str) -> list[Path]:
    """Source files of a module or package, found without importing it (a cached run stays light)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no module {name} to fingerprint")
    path = Path(spec.origin)
    return sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]


@functools.cache
def code_fingerprint(stage: str) -> str:
    digest = hashlib.sha256()
    for name in STAGE_CODE[stage] + (f"tasks.{stage}",):
        for path in _module_files(name):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, ArtifactRef):
        return {"ref": value.stage, "sha256": value.sha256}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def stage_key(stage: str, params: dict[str, Any]) -> str:
    """Key of a stage run: params (configs and upstream refs by content hash) plus its code fingerprint.
    The `ctx` parameter (tracking ids, paths) is left out except for the project folder."""
    semantic = {k: v for k, v in params.items() if k != "ctx"}
    if "ctx" in params:
        semantic["project"] = str(params["ctx"].project_dir)
    blob = json.dumps({"stage": stage, "params": _canonical(semantic), "code": code_fingerprint(stage)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
