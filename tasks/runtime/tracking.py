"""MLflow tracking for flows and tasks: one parent run per flow run, one child run per task.

Child runs are created with an explicit parent id through MlflowClient, because MLflow's active-run
stack is per thread and Prefect may run tasks on worker threads. Inside a child run the fluent API is
activated with the explicit run id (nested=True), so it never depends on what another thread started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from prefect.exceptions import TerminationSignal
from pydantic import BaseModel, Field

from rmens.config import flatten_set
from rmens.fingerprint import digest
from tasks.runtime.locks import holder_is_gone, process_identity
from tasks.runtime.paths import ProjectPaths, remember_tracking_uri

log = logging.getLogger(__name__)
# MLflow 3 opens an experiment on its GenAI (traces) page unless it is marked as model development.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


# The runs table as `rmens ui` opens it: MLflow's shared view (what its Share button stores in an experiment tag,
# opened by ?viewStateShareKey=), with the headline numbers as columns, which it otherwise hides.
SHARED_VIEW = "rmens"
VIEW_TAG = f"mlflow.sharedViewState.{SHARED_VIEW}"


def experiment_name(paths: ProjectPaths) -> str:
    """One MLflow experiment per project folder (runs/<preset>), so presets stay apart on a shared server."""
    return f"rmens-{paths.root.name}"


class StageContext(BaseModel):
    """What every task needs besides its inputs: where the project lives and the run to report under."""

    project_dir: str
    # The store the parent run is in, fixed where the flow runs: a step on another process (a Ray worker)
    # inherits MLFLOW_TRACKING_URI as this process exported it, which may name an earlier project's store.
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    # The stage call this context is passed to, set by the Stager: its key, computed once and reused by
    # Prefect's cache policy and by run_stage (a stage key serialises the whole config and hashes code),
    # its label (the arm or role: child runs are named `stage:label`) and what MLflow compare views group
    # by (arm, kind, k, rule), logged as rmens.* tags and as params.
    stage_key: str | None = None
    stage_label: str | None = None
    stage_tags: dict[str, str] = Field(default_factory=dict)
    refresh: bool = False  # --refresh: rebuild the stage's folder even when it is complete and intact
    # The devices the call was given (its step's declaration or the run's `resources`): a step that shards
    # starts one rank per device when there are several (rmens.steps.contract.granted_devices).
    stage_devices: int | None = None
    # Trained reward models are logged as MLflow models, and registered under `registered_model` when set,
    # with `model_aliases` (None: the stage's label) pointing at the new version.
    log_models: bool = False
    registered_model: str | None = None
    model_aliases: list[str] | None = None

    def for_stage(self, key: str, label: str, tags: dict[str, str] | None = None,
                  refresh: bool = False, devices: int | None = None) -> StageContext:
        return StageContext.model_validate({**self.model_dump(), "stage_key": key, "stage_label": label,
                                            "stage_tags": tags or {}, "refresh": refresh, "stage_devices": devices})

    def run_name(self, stage: str) -> str:
        return f"{stage}:{self.stage_label}" if self.stage_label else stage

    def run_tags(self, stage: str) -> dict[str, str]:
        return {"rmens.stage": stage, **({"rmens.label": self.stage_label} if self.stage_label else {}),
                **{f"rmens.{k}": v for k, v in self.stage_tags.items()}}

    @property
    def paths(self) -> ProjectPaths:
        return ProjectPaths.at(self.project_dir)


def setup(paths: ProjectPaths, experiment: str | None = None) -> str:
    """Point MLflow at the project store (or MLFLOW_TRACKING_URI) and return the experiment id.

    The first use of a SQLite store creates its tables; two processes doing that at once on a fresh
    project crashed (MLflow's migrations are not safe to run concurrently), so the store and the
    experiment are created under a file lock. Runs that an earlier, killed process left RUNNING are
    closed here, once per process and store.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    paths.make()
    experiment = experiment or experiment_name(paths)
    with FileLock(paths.root / ".mlflow-setup.lock"):
        _ensure_store(paths)
        _use(paths.tracking_uri)
        client = MlflowClient(paths.tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            location = None if paths.tracking_uri.startswith("http") else paths.mlflow_artifacts.as_uri()
            experiment_id = client.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_KIND)
        else:
            experiment_id = found.experiment_id
    if (paths.tracking_uri, experiment_id) not in _SWEPT:
        close_orphaned_runs(client, experiment_id)
        _SWEPT.add((paths.tracking_uri, experiment_id))
    return experiment_id


_SWEPT: set[tuple[str, str]] = set()


def _ensure_store(paths: ProjectPaths) -> None:
    """The project's own SQLite store, built under another name and renamed into place: MLflow creates its
    tables by a series of migrations, and a process killed in the middle left a half-built mlflow.db on which
    every later run failed ("table ... already exists"). One that an earlier version left half-built is moved
    aside (never deleted) and a new one made. Called under the setup lock."""
    db = paths.mlflow_db
    if paths.tracking_uri != f"sqlite:///{db}" or (db.exists() and _store_is_complete(db)):
        return
    if db.exists():
        aside = db.with_name(f"{db.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("-journal", "-wal", "-shm"):  # SQLite's own files go with it, or they would meet the new one
            companion = db.with_name(db.name + suffix)
            if companion.exists():
                os.replace(companion, aside.with_name(aside.name + suffix))
        os.replace(db, aside)
        log.warning("%s was left half-built by a run killed while creating it: moved to %s, making a new one",
                    db, aside.name)
    building = db.with_name(db.name + ".building")
    building.unlink(missing_ok=True)  # what a process killed while building left (we hold the lock)
    MlflowClient(f"sqlite:///{building}").search_experiments(max_results=1)  # creates and migrates the tables
    os.replace(building, db)


def _store_is_complete(db: Path) -> bool:
    """MLflow stamps the schema version once its migrations have run: a store without it is half-built.
    Opened for writing, as any SQLite user opens it: a process killed mid-write leaves a hot journal, which
    the first connection rolls back (a read-only one cannot, and failed on a complete store). Any error
    but the missing stamp is raised: a store that cannot be read is never moved aside for one."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        try:
            return conn.execute("SELECT version_num FROM alembic_version").fetchone() is not None
        except sqlite3.OperationalError as err:
            if "no such table" in str(err):
                return False
            raise


def close_orphaned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the runs still RUNNING whose process is gone (SIGKILL, power loss): they would
    otherwise show as running forever in the UI."""
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        owner = {"host": tags.get("rmens.host"), "pid": int(tags.get("rmens.pid", -1)),
                 "started": float(tags.get("rmens.pid_started", 0)) or None}
        if holder_is_gone(owner):
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.warning("closed %d MLflow run(s) left RUNNING by a process that is gone, as KILLED", len(closed))
    return closed


def _use(uri: str) -> None:
    """Make `uri` the fluent API's store (needed by log_model, log_input)."""
    if os.environ.get("MLFLOW_TRACKING_URI") != uri:
        # A project's own store, which set_tracking_uri exports: remembered as ours. The user's own
        # MLFLOW_TRACKING_URI is not, or every later use would take it for ours and go to the project's SQLite
        # file instead (it did: a worker's tracking server got nothing after its first call).
        remember_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)


def client_for(ctx: StageContext) -> MlflowClient:
    return MlflowClient(ctx.tracking_uri or ctx.paths.tracking_uri)


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start: start + 100])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0,
                model_id: str | None = None) -> None:
    """Numbers (NaN and non-numbers left out) at one step; `model_id` links them to a logged model, whose
    registered versions then show them."""
    import time

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step, model_id=model_id) for k, v in metrics.items()
             if isinstance(v, (int, float)) and v == v]
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start: start + 1000])


def _owner_tags() -> dict[str, str]:
    me = process_identity()
    return {"rmens.host": me["host"], "rmens.pid": str(me["pid"]), "rmens.pid_started": str(me["started"])}


def end_status(exc: BaseException | None) -> str:
    """FINISHED, KILLED for an interrupt (Ctrl-C, SIGTERM), FAILED for an error."""
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit, TerminationSignal)) else "FAILED"


def _start(client: MlflowClient, experiment_id: str, name: str, parent: str | None, tags: dict[str, str]) -> str:
    all_tags = {**tags, **_owner_tags(), "mlflow.runName": name}
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


@contextlib.contextmanager
def parent_run(paths: ProjectPaths, flow: str, config: BaseModel, tags: dict[str, str] | None = None
               ) -> Iterator[StageContext]:
    experiment_id = setup(paths)
    client = MlflowClient(paths.tracking_uri)
    short = digest(config.model_dump(mode="json"))[:7]
    run_id = _start(client, experiment_id, f"{flow} · {short}", None,
                    {"rmens.flow": flow, "rmens.config_digest": short, **(tags or {})})
    log_params(client, run_id, flatten_set(config))  # what this run set; config.json holds every setting
    client.log_dict(run_id, config.model_dump(mode="json"), "config.json")
    error = None
    try:
        yield StageContext(project_dir=str(paths.root), tracking_uri=paths.tracking_uri, experiment_id=experiment_id,
                           parent_run_id=run_id)
    except BaseException as exc:
        error = exc
        raise
    finally:
        client.set_terminated(run_id, end_status(error))
        if error is not None:
            close_children(client, experiment_id, run_id, end_status(error))


@contextlib.contextmanager
def child_run(ctx: StageContext, stage: str, params: dict[str, Any], tags: dict[str, str] | None = None,
              name: str | None = None) -> Iterator[str]:
    """A child run of the flow's run (named `name`, default the stage), active in this thread for the fluent
    API while the body runs."""
    client = client_for(ctx)
    experiment_id = ctx.experiment_id or setup(ctx.paths)
    run_id = _start(client, experiment_id, name or stage, ctx.parent_run_id, {"rmens.stage": stage, **(tags or {})})
    log_params(client, run_id, params)
    _use(ctx.tracking_uri or ctx.paths.tracking_uri)
    error = None
    try:
        with mlflow.start_run(run_id=run_id, nested=True):
            yield run_id
    except BaseException as exc:
        error = exc
        raise
    finally:
        try:
            client.set_terminated(run_id, end_status(error))
        except Exception:  # noqa: BLE001 - closing must not hide the error that ended the run
            if error is None:
                raise
            log.warning("could not mark MLflow run %s %s; the flow's run closes it", run_id, end_status(error))


def close_children(client: MlflowClient, experiment_id: str, parent_id: str, status: str) -> None:
    """A signal that lands inside an MLflow write can make that child's own close fail ("database is
    locked" while the interrupted transaction unwinds); the parent closes what is left once it can."""
    query = f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([experiment_id], query, max_results=1000):
        client.set_terminated(run.info.run_id, status)


def record_cache_hit(ctx: StageContext, stage: str, ref, extra_tags: dict[str, str] | None = None) -> str:
    """A child run that says this stage was a cache hit, linked to the run that made the artifact."""
    client = client_for(ctx)
    tags = {"rmens.stage": stage, "rmens.cache_hit": "true", "rmens.artifact": ref.path,
            "rmens.cached_from_run_id": ref.run_id or "",
            "mlflow.note.content": f"Cache hit: the artifact was produced by run {ref.run_id}.",
            **(extra_tags or {})}
    run_id = _start(client, ctx.experiment_id or setup(ctx.paths), f"{ctx.run_name(stage)} (cached)",
                    ctx.parent_run_id, {**ctx.run_tags(stage), **tags})
    log_metrics(client, run_id, {k: v for k, v in ref.summary.items() if isinstance(v, (int, float))})
    client.set_terminated(run_id, "FINISHED")
    return run_id
