"""What every stage task shares: its cache policy, retries, lock, output folder and MLflow child run."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.transactions import IsolationLevel

from rmens.config import flatten
from tasks.runtime.keys import stage_key
from tasks.runtime.locks import ProjectLockManager
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.refs import ArtifactRef, changes_since_sealed, fingerprint_folder, read_ref, seal
from tasks.runtime.tracking import StageContext, child_run, client_for, log_metrics, record_cache_hit, set_tags

log = logging.getLogger(__name__)

TRANSIENT = (ConnectionError, TimeoutError, BlockingIOError, InterruptedError)


def is_transient(exc: BaseException | None) -> bool:
    """Retry only what may pass on its own: network hiccups, timeouts, a busy SQLite file."""
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, sqlite3.OperationalError) or "database is locked" in str(exc)


def _retry_condition(task_obj, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we only classify it
        return is_transient(exc)
    return False


def _cache_key(stage: str) -> Callable:
    def key(context, parameters: dict[str, Any]) -> str:
        ctx = parameters.get("ctx")
        return f"{stage}-{(ctx.stage_key if ctx is not None else None) or stage_key(stage, parameters)}"

    return key


def stage_task(stage: str, *, timeout_seconds: float, retries: int = 2) -> Callable:
    """Decorate a stage function as a Prefect task keyed by config + input hashes + code fingerprint."""

    def decorate(fn: Callable) -> Task:
        return task(
            name=stage, cache_policy=CacheKeyFnPolicy(cache_key_fn=_cache_key(stage)), result_serializer="json",
            persist_result=True, retries=retries, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_condition,
            timeout_seconds=timeout_seconds,
        )(fn)

    return decorate


def for_project(stage_task_obj: Task, paths: ProjectPaths, refresh: bool = False,
                task_run_name: str | None = None) -> Task:
    """The task bound to a project's result store, with a file lock so that two flows never compute
    the same artifact at once (SERIALIZABLE: the second waits, then reads the cached result)."""
    policy = CacheKeyFnPolicy(cache_key_fn=stage_task_obj.cache_policy.cache_key_fn).configure(
        isolation_level=IsolationLevel.SERIALIZABLE,
        lock_manager=ProjectLockManager(lock_files_directory=paths.locks))
    # One with_options call: building a Prefect Task is not free (about 20 ms), and cached runs are short.
    return stage_task_obj.with_options(cache_policy=policy, result_storage=paths.results, refresh_cache=refresh or None,
                                       task_run_name=task_run_name or stage_task_obj.name)


def run_stage(ctx: StageContext, stage: str, params: dict[str, Any],
              build: Callable[[Path, str], dict[str, Any]], log_params: dict[str, Any] | None = None,
              resume: bool = False, run_name: str | None = None) -> ArtifactRef:
    """Compute a stage's output folder once: reuse it when complete, else build it under an MLflow child run.

    `build(folder, run_id)` writes into `folder` and returns a small summary (logged as metrics).
    A folder without ref.json is incomplete (a crash mid-build): it is rebuilt from scratch, or, with
    `resume`, handed back to `build` as it is (PPO continues from its last checkpoint).
    """
    key = ctx.stage_key or stage_key(stage, {**params, "ctx": ctx})
    folder = ctx.paths.stage_dir(stage, key)
    rebuild = ctx.refresh  # asked to recompute: a complete folder is not reused either
    if not rebuild and (folder / "ref.json").is_file():
        changes = changes_since_sealed(folder)
        if not changes:
            # Another run made it while this one waited for the stage lock (or Prefect's record of it was
            # lost): reuse it, and say so in MLflow as a cache hit does, so this flow's run lists every stage.
            log.info("%s: reusing %s", stage, folder)
            ref = read_ref(folder)
            record_cache_hit(ctx, stage, ref)
            return ref
        log.warning("%s: %s changed since it was made (%s): recomputing it", stage, folder, "; ".join(changes[:3]))
        rebuild = True
    if rebuild or not resume:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    flat = log_params if log_params is not None else params_for_tracking(params)
    flat.update(ctx.stage_tags)  # arm, kind, k, rule: as params too, which compare views list and plot
    with child_run(ctx, stage, flat, {**ctx.run_tags(stage), "rmens.key": key[:16]},
                   name=run_name or ctx.run_name(stage)) as run_id:
        # JSON (Prefect's result store) has no NaN: store "not available" as None from the start.
        summary = {k: (None if isinstance(v, float) and v != v else v) for k, v in build(folder, run_id).items()}
        sha256, files = fingerprint_folder(folder)
        ref = ArtifactRef(stage=stage, key=key, path=str(folder), sha256=sha256, mlflow_run_id=run_id,
                          summary=summary, files=files)
        # At the stage's last step (where it has steps): a final value continues its curve, e.g. val_accuracy.
        step = int(summary.get("steps") or 0)
        client = client_for(ctx)
        log_metrics(client, run_id, {k: v for k, v in summary.items() if isinstance(v, (int, float))}, step)
        set_tags(client, run_id, {"rmens.artifact": ref.path, "rmens.sha256": ref.sha256})
    return seal(ref)


def params_for_tracking(params: dict[str, Any]) -> dict[str, Any]:
    """Stage parameters as flat MLflow params: configs by field, upstream artifacts by content hash."""
    flat: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, ArtifactRef):
            flat[f"{name}.sha256"] = value.sha256[:16]
        elif isinstance(value, dict) and value and all(isinstance(v, ArtifactRef) for v in value.values()):
            flat.update({f"{name}.{k}.sha256": v.sha256[:16] for k, v in value.items()})
        elif hasattr(value, "model_dump"):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and hasattr(value[0], "model_dump"):
            flat[name] = [v.model_dump(mode="json") for v in value]
        else:
            flat[name] = value
    return flat
