"""How flows call stage tasks: bound to the project's result store, refreshed when an artifact folder
has gone missing, and recorded in MLflow as a cache hit when Prefect served the result from cache."""

from __future__ import annotations

import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from prefect import Task
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal

from tasks.runtime.keys import stage_key
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.refs import ArtifactRef, changes_since_sealed
from tasks.runtime.stage import for_project
from tasks.runtime.tracking import StageContext, record_cache_hit

# One line per stage as it starts and ends, for the console (flows/cli.py gives this logger its handler;
# Prefect's logging set-up, which governs the other loggers, leaves it alone).
progress = logging.getLogger("rmens.progress")

# SIGTERM during a flow: Prefect's handler raises TerminationSignal wherever the main thread is, and when that
# is inside a garbage-collector callback Python prints "Exception ignored" and the run goes on as if no
# signal came (seen with SQLAlchemy's weakref callbacks). So the handler also leaves a flag that every
# stage boundary checks. Prefect looks its handler up by this module attribute (to install it and to
# recognise it), so wrapping the attribute keeps its cancellation logic intact.
_TERMINATION = threading.Event()


def _remember_termination() -> None:
    import prefect.utilities.engine as engine

    original = getattr(engine, "_prefect_sigterm_handler", None)
    if original is None or getattr(original, "rmens_wrapped", False):
        return

    def handler(signum, *args):
        _TERMINATION.set()
        return original(signum, *args)

    handler.rmens_wrapped = True
    engine._prefect_sigterm_handler = handler


_remember_termination()


def stop_if_terminated() -> None:
    """Raise Prefect's TerminationSignal if a SIGTERM arrived and its exception was swallowed."""
    if _TERMINATION.is_set():
        raise TerminationSignal(signal.SIGTERM)


class Stager:
    """Calls stage tasks for one flow run and remembers which were cache hits.

    Use it as a context manager inside the flow's parent MLflow run: the cache-hit records are written
    on a background thread (MLflow's store and Prefect's API are separate, so the writes overlap the
    orchestration of the next stages) and are flushed, errors included, when the block ends.
    """

    def __init__(self, ctx: StageContext, refresh: bool = False):
        self.ctx = ctx
        self.paths = ProjectPaths.at(ctx.project_dir)
        self.refresh = refresh
        self.states: dict[str, str] = {}
        self.outputs: list[tuple[str, ArtifactRef]] = []  # (stage:label, its artifact), in the order they ran
        self._tracking = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rmens-tracking")
        self._pending: list[Future] = []

    def __enter__(self) -> Stager:
        return self

    def __exit__(self, *exc) -> None:
        self._tracking.shutdown(wait=True)
        for future in self._pending:
            future.result()  # surface a failed tracking write

    def __call__(self, task_obj: Task, label: str, /, *, tags: dict[str, str] | None = None,
                 **params: Any) -> ArtifactRef:
        """Run `task_obj` for `label` (the arm or role it is computed for) with `params`; `tags` are what
        MLflow compare views group by (Arm.describe()). Returns the artifact reference."""
        stop_if_terminated()
        stage, name = task_obj.name, f"{task_obj.name}:{label}"
        bound = inspect.signature(task_obj.fn).bind(ctx=self.ctx, **params)
        bound.apply_defaults()  # the key covers every parameter, as the task's own key does
        key = stage_key(stage, dict(bound.arguments))  # once: the task's cache policy and run_stage reuse it
        ctx = self.ctx.for_stage(key, label, tags, refresh=self.refresh)
        # A cached reference to a folder that was deleted or changed would serve a wrong artifact:
        # recompute instead (run_stage says what changed).
        folder = self.paths.stage_dir(stage, key)
        stale = not (folder / "ref.json").is_file() or bool(changes_since_sealed(folder))
        task_run = for_project(task_obj, self.paths, refresh=self.refresh or stale, task_run_name=name)
        progress.info("%-40s started", name)
        start = time.perf_counter()
        state = task_run(ctx=ctx, **params, return_state=True)
        ref = state.result()
        if isinstance(ref, dict):  # JSON results come back as plain data
            ref = ArtifactRef.model_validate(ref)
        self.states[name] = state.name
        self.outputs.append((name, ref))
        cached = state.name == "Cached"
        progress.info("%-40s %s in %.1f s", name, "cached" if cached else "computed", time.perf_counter() - start)
        stop_if_terminated()
        if cached:
            self._pending.append(self._tracking.submit(record_cache_hit, ctx, stage, ref))
        return ref


def flow_run_tags() -> dict[str, str]:
    run = FlowRunContext.get()
    if run is None or run.flow_run is None:
        return {}
    return {"prefect.flow_run_id": str(run.flow_run.id), "prefect.flow_run_name": run.flow_run.name}


def flow_run_name(flow: str) -> Callable[[], str]:
    """A readable Prefect flow-run name, `<flow>:<preset, size or label> <time>`, instead of a random one."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters
        config = params.get("config")
        subject = (getattr(config, "name", None) or getattr(config, "size", None) or getattr(config, "label", None)
                   or params.get("preset") or params.get("size") or "default")
        return f"{flow}:{subject} {time.strftime('%m-%d %H:%M:%S')}"

    return name
