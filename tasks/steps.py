"""Any declared library step (rmens.steps) as a Prefect task: the store's key as Prefect's cache key, a
project lock so that two flows never compute one output at once, retries of what may pass on its own,
and one MLflow child run per computed step (its settings as params, its live and final metrics, its small
result files), or a cache-hit run linked to the run that made it. What MLflow gets beyond that, per step,
is in AFTER."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from prefect import Task, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.transactions import IsolationLevel

from rmens.config import flatten_set
from rmens.steps import Output, Step, Store
from rmens.steps.contract import DECLARED, devices_granted, granted_devices, metrics_to
from rmens.steps.store import DONE, STARTED
from tasks.runtime.locks import ProjectLockManager
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.tracking import StageContext, child_run, client_for, log_metrics, record_cache_hit, set_tags

log = logging.getLogger(__name__)

TRANSIENT = (ConnectionError, TimeoutError, BlockingIOError, InterruptedError)
# Result files a step's MLflow run keeps: the small ones at the top of its folder, and these folders of figures.
LOGGED_SUFFIXES = (".json", ".jsonl", ".csv", ".png", ".md")
LOGGED_FOLDERS = ("curves", "alpaca_eval", "ppo_curve", "ppo_curves")
LOGGED_MAX_BYTES = 5 * 2**20
TIMEOUT_S = 24 * 3600


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


def _cache_key(context, parameters: dict[str, Any]) -> str:
    ctx = parameters["ctx"]
    return f"{parameters['step_name']}-{ctx.stage_key}"


def run_step(ctx: StageContext, step_name: str, label: str, inputs: dict[str, Any],
             module: str | None = None) -> Output:
    """The body of every step task: the store's reuse-or-compute, tracked in MLflow. `module` declares the
    step in a process that has not imported it (a Ray worker)."""
    if step_name not in DECLARED and module:
        importlib.import_module(module)
    step = DECLARED[step_name]
    store = Store(ctx.paths.artifacts)
    with devices_granted(ctx.stage_devices):
        output, computed = store.run(step, inputs, key=ctx.stage_key, refresh=ctx.refresh,
                                     around=_tracked(ctx, inputs), after=lambda out: _record(ctx, out))
    if not computed:
        # Another run made it while this one waited for the lock (or Prefect's record of it was lost): say
        # so in MLflow as a cache hit does, so that this flow's run lists every step.
        log.info("%s: reusing %s", step.name, output.path)
        record_cache_hit(ctx, step.name, output)
    return output


_TASKS: dict[str, Task] = {}


def step_task(step: Step) -> Task:
    """The Prefect task of a step, named after it (made once per process)."""
    if step.name not in _TASKS:
        _TASKS[step.name] = task(
            name=step.name, cache_policy=CacheKeyFnPolicy(cache_key_fn=_cache_key), result_serializer="json",
            persist_result=True, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_condition,
            timeout_seconds=TIMEOUT_S)(run_step)
    return _TASKS[step.name]


def for_project(step: Step, paths: ProjectPaths, refresh: bool = False, task_run_name: str | None = None) -> Task:
    """The step's task bound to a project's result store, with a file lock so that two flows never compute
    the same output at once (SERIALIZABLE: the second waits, then reads the cached result)."""
    policy = CacheKeyFnPolicy(cache_key_fn=_cache_key).configure(
        isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=ProjectLockManager(lock_files_directory=paths.locks))
    # One with_options call: building a Prefect Task is not free (about 20 ms), and cached runs are short.
    return step_task(step).with_options(cache_policy=policy, result_storage=paths.results,
                                        refresh_cache=refresh or None, task_run_name=task_run_name or step.name)


def _tracked(ctx: StageContext, inputs: dict[str, Any]) -> Callable:
    @contextlib.contextmanager
    def around(step: Step, folder: Path) -> Iterator[str]:
        params = {**params_for_tracking(inputs), **ctx.stage_tags}  # arm, kind, k, rule: compare views plot them
        tags = {**ctx.run_tags(step.name), "rmens.key": ctx.stage_key[:16]}
        if "CUDA_VISIBLE_DEVICES" in os.environ:  # the devices it was granted (Ray sets it per task)
            tags["rmens.devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
        if step.resources.shards:  # the FSDP2 ranks it trains with (one: in the step's own process)
            tags["rmens.ranks"] = str(granted_devices())
        with child_run(ctx, step.name, params, tags, name=ctx.run_name(step.name)) as run_id:
            client = client_for(ctx)
            client.log_dict(run_id, settings_for_tracking(inputs), "settings.json")
            with metrics_to(lambda number, metrics: log_metrics(client, run_id, metrics, number)):
                yield run_id

    return around


def _record(ctx: StageContext, output: Output) -> None:
    """Inside the step's child run, once its folder is sealed: final metrics, result files, the step's extras."""
    client = client_for(ctx)
    numbers = {k: v for k, v in output.summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for path in sorted(output.folder.iterdir()):
        if path.is_file() and path.suffix in LOGGED_SUFFIXES and path.name not in (DONE, STARTED) \
                and path.stat().st_size <= LOGGED_MAX_BYTES:
            mlflow.log_artifact(str(path))
        elif path.is_dir() and path.name in LOGGED_FOLDERS:
            mlflow.log_artifacts(str(path), path.name)
    set_tags(client, output.run_id, {"rmens.artifact": output.path})
    extra = AFTER.get(output.step)
    model_id = extra(ctx, output) if extra is not None else None
    # At the step's last step (where it has steps): a final value continues its curve, e.g. val_accuracy;
    # linked to the model the step logged, if any, so that its registered version shows them.
    log_metrics(client, output.run_id, numbers, int(output.summary.get("steps") or 0), model_id=model_id)


def _log_datasets(ctx: StageContext, output: Output) -> None:
    """The prepared pairs as MLflow datasets of the run (its Inputs in the UI)."""
    import pandas as pd

    from rmens.data.loaders import load_jsonl_pairs

    for split, context in (("train", "training"), ("val", "validation")):
        pairs = load_jsonl_pairs(output.file(split))  # not read_pairs: the output is not sealed yet
        if not pairs:
            continue
        frame = pd.DataFrame([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "weight": p.weight}
                              for p in pairs])
        with warnings.catch_warnings():
            # MLflow registers two local-file dataset sources and warns that a path fits both; either is right.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(frame, source=str(output.file(split)), name=f"{ctx.stage_label}-{split}")
        mlflow.log_input(dataset, context=context)


def _log_model(ctx: StageContext, output: Output) -> str | None:
    """A trained reward model as an MLflow model (registered under the flow's name, its label the alias unless
    the flow names others, its version described and tagged with its arm); the gold is not one of the models a
    user deploys. Returns the logged model's id, to which the step's final metrics are linked."""
    mlflow.log_artifact(str(output.file("ensemble") / "ensemble.json"))
    if not ctx.log_models or ctx.stage_label == "gold":
        return None
    from rmens.models.config import AggregationConfig
    from tasks.registry import log_and_register

    aliases = [ctx.stage_label] if ctx.model_aliases is None else ctx.model_aliases
    uri, version = log_and_register(str(output.file("ensemble")), ctx.registered_model, aliases,
                                    AggregationConfig().model_dump(), name=f"reward-model-{ctx.stage_label}")
    client = client_for(ctx)
    set_tags(client, output.run_id, {"rmens.model_uri": uri, "rmens.model_version": str(version)})
    if version:
        client.update_model_version(ctx.registered_model, version, description=_describe_version(ctx, output))
        for key, value in {**ctx.stage_tags, "rmens.key": ctx.stage_key[:16], "rmens.run_id": output.run_id}.items():
            client.set_model_version_tag(ctx.registered_model, version, key, value)
    # An id, not a measurement: text in the summary (so not a metric), read by the retrain flow. `after`
    # runs before the store writes done.json, so the stored summary has it too.
    output.summary["model_version"] = str(version or "")
    return uri.removeprefix("models:/") if uri.startswith("models:/m-") else None


def _describe_version(ctx: StageContext, output: Output) -> str:
    """What a registry reader needs to pick a version: what it is, how it scored on held-out pairs, where
    it came from."""
    summary = output.summary
    shown = ("val_accuracy", "val_ece", "val_member_accuracy_mean")
    numbers = ", ".join(f"{name} {summary[name]:.3f}" for name in shown if isinstance(summary.get(name), (int, float)))
    return (f"rmens reward model {ctx.stage_label} ({', '.join(f'{k} {v}' for k, v in ctx.stage_tags.items())}); "
            f"held-out pairs: {numbers or 'not measured'}; trained in MLflow run {output.run_id}, "
            f"artifact {output.path}.")


def _log_ppo_history(ctx: StageContext, output: Output) -> None:
    mlflow.log_artifact(str(output.file("history")))


# What MLflow gets beyond a step's metrics and small files, per step; a hook that logs a model returns its id.
AFTER: dict[str, Callable[[StageContext, Output], str | None]] = {
    "prepare_data": _log_datasets, "train_ensemble": _log_model, "train": _log_model, "ppo": _log_ppo_history,
}


def settings_for_tracking(inputs: dict[str, Any]) -> dict[str, Any]:
    """Every setting of a step's inputs, as JSON (earlier outputs by key)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Output):
            return {"step": value.step, "key": value.key}
        if hasattr(value, "model_dump"):
            return value.model_dump(mode="json")
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return {name: plain(value) for name, value in inputs.items()}


def params_for_tracking(inputs: dict[str, Any]) -> dict[str, Any]:
    """Step inputs as flat MLflow params: configs by the fields set away from their defaults (every field is
    in the run's settings.json), earlier outputs by key."""
    flat: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, Output):
            flat[f"{name}.key"] = value.key[:16]
        elif isinstance(value, dict) and value and all(isinstance(v, Output) for v in value.values()):
            flat.update({f"{name}.{k}.key": v.key[:16] for k, v in value.items()})
        elif isinstance(value, list) and value and all(isinstance(v, Output) for v in value):
            flat.update({f"{name}.{i}.key": v.key[:16] for i, v in enumerate(value)})  # a full ensemble's members
        elif hasattr(value, "model_dump"):
            flat.update(flatten_set(value, f"{name}."))
        elif isinstance(value, list) and value and hasattr(value[0], "model_dump"):
            flat[name] = [v.model_dump(mode="json") for v in value]
        else:
            flat[name] = value
    return flat
