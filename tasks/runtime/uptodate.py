"""Whether a flow's last complete run still stands, answered without Prefect or MLflow.

A re-run of the same config, by the same code, over artifacts that are all intact would be nothing but
cache hits: every stage key would come out as before and every folder would be reused. Finding that out
through Prefect costs more than the answer is worth (about 5 s of Prefect and MLflow imports, then an API
call per task), so a finished flow leaves a record of what it used, `last_<flow>.json`, and the CLI checks
it first, as `make` checks its targets. The check is conservative: any change to the config or to any source
file of rmens, tasks or flows, an artifact that is missing or differs from its manifest, a parent run that
is gone from the project's MLflow store, or a store other than the project's own sends the run through
Prefect as usual, where each stage decides for itself. It is as blind as Prefect's cache is to what no
stage key covers (the bytes of a data file a config names by path, installed library versions).
"""

from __future__ import annotations

import datetime
import logging
import os
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

from pydantic import BaseModel

from rmens.fingerprint import digest, source_fingerprint
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.refs import ArtifactRef, changes_since_sealed, read_ref

log = logging.getLogger(__name__)

# Everything that decides which stages a flow runs, with which parameters, and what each computes.
CODE = ("rmens", "tasks", "flows")


class StageOutput(BaseModel):
    name: str  # stage:label, as the console and MLflow show it
    path: str
    sha256: str


class LastRun(BaseModel):
    """What a complete flow run used and made (its stages in the order they ran)."""

    flow: str
    project: str
    config_digest: str
    code: str
    parent_run_id: str
    finished_at: str
    report: str
    stages: list[StageOutput]


def _record_file(paths: ProjectPaths, flow: str) -> Path:
    return paths.root / f"last_{flow}.json"


def config_digest(config: BaseModel) -> str:
    return digest(config.model_dump(mode="json"))


def code_on_disk() -> str:
    """The source fingerprint as the files are now (source_fingerprint itself is cached per process)."""
    return source_fingerprint.__wrapped__(CODE)


def record_last_run(paths: ProjectPaths, flow: str, config: BaseModel, code_at_start: str, parent_run_id: str,
                    report: str, refs: list[tuple[str, ArtifactRef]]) -> LastRun | None:
    """Write the record of a flow that has just finished. `code_at_start` is code_on_disk() when it started:
    stage keys were computed while it ran, so a source file edited meanwhile leaves no record (and removes
    an older one). A record that cannot be written costs only the shortcut, so that is a warning."""
    target = _record_file(paths, flow)
    if code_at_start != code_on_disk() or paths.tracking_uri != _own_store(paths):
        target.unlink(missing_ok=True)
        return None
    last = LastRun(flow=flow, project=str(paths.root), config_digest=config_digest(config), code=code_at_start,
                   parent_run_id=parent_run_id, finished_at=datetime.datetime.now().isoformat(timespec="seconds"),
                   report=report, stages=[StageOutput(name=name, path=ref.path, sha256=ref.sha256)
                                          for name, ref in refs])
    try:
        # A unique temporary name: two flows of different configs may finish in one project at once.
        fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".partial", dir=paths.root)
        with os.fdopen(fd, "w") as handle:
            handle.write(last.model_dump_json(indent=1))
        os.replace(tmp, target)
    except OSError as err:
        log.warning("could not write %s (%s): the next unchanged run goes through Prefect", target, err)
        return None
    return last


def still_standing(paths: ProjectPaths, flow: str, config: BaseModel) -> LastRun | None:
    """The last complete run of `flow` in this project, if re-running `config` now would only reuse its
    artifacts; None when anything it depended on has changed (or there is no such run)."""
    try:
        last = LastRun.model_validate_json(_record_file(paths, flow).read_text())
    except (OSError, ValueError):  # missing, or unreadable (a ValidationError is a ValueError): no shortcut
        return None
    if (last.flow, last.project, last.config_digest) != (flow, str(paths.root), config_digest(config)):
        return None  # another flow, a copied project (its keys differ), or another config
    if paths.tracking_uri != _own_store(paths) or not _run_is_active(paths.mlflow_db, last.parent_run_id):
        return None
    if last.code != code_on_disk():
        return None
    return last if all(_intact(paths, stage) for stage in last.stages) else None


def _own_store(paths: ProjectPaths) -> str:
    # Only the project's own SQLite store can be checked without MLflow; with a tracking server the run
    # goes through Prefect and MLflow as usual.
    return f"sqlite:///{paths.mlflow_db}"


def _run_is_active(db: Path, run_id: str) -> bool:
    """The parent run and its experiment are still in the store, not deleted (read with sqlite3: importing
    MLflow is what the shortcut avoids)."""
    if not db.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            row = conn.execute("SELECT r.lifecycle_stage, e.lifecycle_stage FROM runs r JOIN experiments e "
                               "ON r.experiment_id = e.experiment_id WHERE r.run_uuid = ?", (run_id,)).fetchone()
    except sqlite3.Error:
        return False
    return row == ("active", "active")


def _intact(paths: ProjectPaths, stage: StageOutput) -> bool:
    if not Path(stage.path).is_relative_to(paths.artifacts):
        return False
    try:
        return read_ref(stage.path).sha256 == stage.sha256 and not changes_since_sealed(stage.path)
    except (OSError, ValueError):
        return False
