"""Whether a flow's last complete run still stands, answered without Prefect or MLflow.

A re-run of the same config, by the same code, over artifacts that are all intact would be nothing but
cache hits: every stage key would come out as before and every folder would be reused. Finding that out
through Prefect costs more than the answer is worth (about 5 s of Prefect and MLflow imports, then an API
call per task), so a finished flow leaves a record of what it used, `last_<flow>.json`, and the CLI checks
it first, as `make` checks its targets. The check is conservative: any change to the config or to any source
file of rmens, tasks or flows, any artifact that is missing or differs from its manifest, or another MLflow
store sends the run through Prefect as usual, where each stage decides for itself.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from pydantic import BaseModel, ValidationError

from rmens.fingerprint import digest, source_fingerprint
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.refs import ArtifactRef, changes_since_sealed, read_ref

# Everything that decides which stages a flow runs, with which parameters, and what each computes.
CODE = ("rmens", "tasks", "flows")


class StageOutput(BaseModel):
    name: str  # stage:label, as the console and MLflow show it
    path: str
    sha256: str


class LastRun(BaseModel):
    """What a complete flow run used and made (its stages in the order they ran)."""

    flow: str
    config_digest: str
    code: str
    tracking_uri: str
    parent_run_id: str
    finished_at: str
    report: str
    stages: list[StageOutput]


def _record_file(paths: ProjectPaths, flow: str) -> Path:
    return paths.root / f"last_{flow}.json"


def config_digest(config: BaseModel) -> str:
    return digest(config.model_dump(mode="json"))


def record_last_run(paths: ProjectPaths, flow: str, config: BaseModel, parent_run_id: str, report: str,
                    refs: list[tuple[str, ArtifactRef]]) -> LastRun:
    """Write the record once the flow has finished (atomically: a half-written one would read as absent)."""
    last = LastRun(flow=flow, config_digest=config_digest(config), code=source_fingerprint(CODE),
                   tracking_uri=paths.tracking_uri, parent_run_id=parent_run_id,
                   finished_at=datetime.datetime.now().isoformat(timespec="seconds"), report=report,
                   stages=[StageOutput(name=name, path=ref.path, sha256=ref.sha256) for name, ref in refs])
    target = _record_file(paths, flow)
    tmp = target.with_suffix(".partial")
    tmp.write_text(json.dumps(last.model_dump(mode="json"), indent=1))
    os.replace(tmp, target)
    return last


def still_standing(paths: ProjectPaths, flow: str, config: BaseModel) -> LastRun | None:
    """The last complete run of `flow` in this project, if re-running `config` now would only reuse its
    artifacts; None when anything it depended on has changed (or there is no such run)."""
    try:
        last = LastRun.model_validate_json(_record_file(paths, flow).read_text())
    except (OSError, ValidationError):
        return None
    if (last.flow, last.config_digest, last.tracking_uri) != (flow, config_digest(config), paths.tracking_uri):
        return None
    if last.tracking_uri == f"sqlite:///{paths.mlflow_db}" and not paths.mlflow_db.is_file():
        return None  # the runs it points at are gone with the store
    if last.code != source_fingerprint(CODE):
        return None
    return last if all(_intact(stage) for stage in last.stages) else None


def _intact(stage: StageOutput) -> bool:
    try:
        return read_ref(stage.path).sha256 == stage.sha256 and not changes_since_sealed(stage.path)
    except (OSError, ValidationError):
        return False
