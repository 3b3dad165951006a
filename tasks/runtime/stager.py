"""How flows run a plan's steps under Prefect: each call keyed by the library's store, submitted as the
step's task bound to the project (refreshed when its folder is gone or changed), and recorded in MLflow as a
cache hit when Prefect served the result from its cache. A Stager is the `call` of rmens plans."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal

from rmens.config import derive
from rmens.steps import Output, Step, Store, step_key
from rmens.steps.contract import metrics_to
from rmens.steps.graph import GraphRun, Node, record, resolve
from rmens.steps.resources_config import call_devices
from rmens.steps.runner import Progress
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.tracking import StageContext, record_cache_hit
from tasks.steps import for_project

# SIGTERM during a flow: Prefect's handler raises TerminationSignal wherever the main thread is, and when that
# is inside a garbage-collector callback Python prints "Exception ignored" and the run goes on as if no
# signal came (seen with SQLAlchemy's weakref callbacks). So the handler also leaves a flag that every
# stage boundary checks. Prefect looks its handler up by this module attribute (to install it and to
# recognise it), so wrapping the attribute keeps its cancellation logic intact.
_TERMINATION = threading.Event()
_INTERRUPTED = threading.Event()


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
    sys.unraisablehook = _quiet_when_stopping(sys.unraisablehook)


def _quiet_when_stopping(hook):
    """Python reports an exception raised inside a garbage-collector callback as "Exception ignored in ...", with
    a traceback, and drops it. When that exception is the stop a signal asked for (SIGTERM's TerminationSignal,
    Ctrl-C's KeyboardInterrupt), a flag stops the run at the next stage boundary instead, and the user sees the
    one line that says so rather than a traceback (and a Ctrl-C is not lost)."""

    def quiet(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _INTERRUPTED.set()
            return
        if _TERMINATION.is_set() and type(unraisable.exc_value).__name__ == "TerminationSignal":
            return
        hook(unraisable)

    return quiet


_remember_termination()


def clear_stop_flags() -> None:
    """At a flow's start (flows.entry): a stop swallowed during an earlier flow in this process is not this one's."""
    _TERMINATION.clear()
    _INTERRUPTED.clear()


def stop_if_terminated() -> None:
    """Raise Prefect's TerminationSignal if a SIGTERM arrived and its exception was swallowed, KeyboardInterrupt
    if a Ctrl-C's was."""
    if _TERMINATION.is_set():
        raise TerminationSignal(signal.SIGTERM)
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


class Stager:
    """Runs plan calls as Prefect tasks for one flow run and remembers which were cache hits.

    Use it as a context manager inside the flow's parent MLflow run: the cache-hit records are written
    on a background thread (MLflow's store and Prefect's API are separate, so the writes overlap the
    orchestration of the next steps) and are flushed, errors included, when the block ends.
    """

    def __init__(self, ctx: StageContext, refresh: bool = False, log_models: bool = False,
                 registered_model: str | None = None, total: int | None = None,
                 model_aliases: list[str] | None = None, resources: dict | None = None):
        """`log_models`: log trained reward models as MLflow models, registered under `registered_model` with
        `model_aliases` (default: the stage's label); `total`: the plan's number of calls, for the progress
        lines; `resources`: the run's per-step requests on Ray (rmens.steps.resources_config)."""
        self.resources = resources or {}
        self.ctx = derive(ctx, log_models=log_models, registered_model=registered_model, model_aliases=model_aliases)
        self.paths = ProjectPaths.at(ctx.project_dir)
        self.store = Store(self.paths.artifacts)
        self.refresh = refresh
        self.progress = Progress(total)
        self.states: dict[str, str] = {}
        self.outputs: dict[str, Output] = {}  # step:label -> its output, in the order they ran
        self._tracking = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rmens-tracking")
        self._pending: list[Future] = []

    def __enter__(self) -> Stager:
        return self

    def __exit__(self, *exc) -> None:
        self._tracking.shutdown(wait=True)
        for future in self._pending:
            future.result()  # surface a failed tracking write

    def run_plan(self, plan: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`plan(*args, call=self, **kwargs)`, call by call; or, when the flow runs on Ray, every call keyed first
        (rmens.steps.graph) and each started as soon as what it reads is finished, asking Ray for the devices
        and memory its step declares. Calls the store holds start no Ray task. Returns what the plan returns,
        with finished outputs."""
        from tasks.runtime.placement import on_ray

        if not on_ray():
            return plan(*args, call=self, **kwargs)
        from rmens.steps.resources_config import unknown_keys
        from tasks.runtime.placement import check_requests, largest_node, node_request

        nodes, returned = record(plan, self.store, *args, refresh=self.refresh, **kwargs)
        unknown = unknown_keys(self.resources, list(nodes))
        if unknown:
            raise ValueError(f"resources: {', '.join(unknown)} names no step or call of this plan")
        self._largest = largest_node()
        check_requests([(n.name, node_request(n, self.resources)[0]) for n in nodes.values() if n.found is None],
                       self._largest)
        graph = GraphRun(nodes, submit=self._submit, reuse=self._reused,
                         # Ray starts it when the devices it asks for are free
                         started=lambda node: self.progress.started(node.name, "submitted"),
                         ended=self._ended, check=stop_if_terminated)
        graph.run()
        return resolve(returned, graph.finished)

    def _submit(self, node: Node, inputs: dict[str, Any]) -> _Submitted:
        from prefect_ray.context import remote_options

        from tasks.runtime.placement import node_request, ray_request

        ctx = self.ctx.for_stage(node.key, node.label, node.tags, refresh=self.refresh,
                                 devices=call_devices(node.name, node.step, self.resources))
        # refresh: the store does not hold it, so a Prefect cache record of it would point at a missing folder
        task_run = for_project(node.step, self.paths, refresh=True, task_run_name=node.name)
        with remote_options(**ray_request(*node_request(node, self.resources), self._largest)):
            return _Submitted(task_run.submit(ctx=ctx, step_name=node.step.name, label=node.label, inputs=inputs,
                                              module=node.step.fn.__module__))

    def _reused(self, node: Node) -> None:
        self.progress.started(node.name, "served from the store")
        self.states[node.name] = "Cached"
        self.outputs[node.name] = node.found
        ctx = self.ctx.for_stage(node.key, node.label, node.tags, refresh=self.refresh)
        self._pending.append(self._tracking.submit(record_cache_hit, ctx, node.step.name, node.found))

    def _ended(self, node: Node, output: Output, seconds: float) -> None:
        self.states[node.name] = "Completed"
        self.outputs[node.name] = output
        self.progress.ended(node.name, f"computed in {seconds:.1f} s (from submission)")

    def __call__(self, step: Step, label: str, /, *, tags: dict[str, str] | None = None, **inputs: Any) -> Output:
        """Run `step` for `label` (the arm or role it is computed for) on `inputs`; `tags` are what MLflow
        compare views group by (Arm.describe()). Returns the step's output."""
        stop_if_terminated()
        name = f"{step.name}:{label}"
        key = step_key(step, inputs)  # once: the task's cache policy and the store reuse it
        ctx = self.ctx.for_stage(key, label, tags, refresh=self.refresh,
                                 devices=call_devices(name, step, self.resources))
        # A cached result pointing at a folder that was deleted or changed would serve a wrong output:
        # recompute instead (the store says what changed).
        stale = self.store.finished(step, key) is None
        task_run = for_project(step, self.paths, refresh=self.refresh or stale, task_run_name=name)
        self.progress.started(name)
        start = time.perf_counter()
        with metrics_to(self.progress.working(name)):
            state = task_run(ctx=ctx, step_name=step.name, label=label, inputs=inputs, return_state=True)
        output = state.result()
        if isinstance(output, dict):  # JSON results come back as plain data
            output = Output.model_validate(output)
        self.states[name] = state.name
        self.outputs[name] = output
        cached = state.name == "Cached"
        self.progress.ended(name, f"{'cached' if cached else 'computed'} in {time.perf_counter() - start:.1f} s")
        stop_if_terminated()
        if cached:
            self._pending.append(self._tracking.submit(record_cache_hit, ctx, step.name, output))
        return output


class _Submitted:
    """A step submitted to Prefect's task runner, as rmens.steps.graph polls it."""

    def __init__(self, future):
        self.future = future

    def done(self) -> bool:
        """From Ray, not Prefect's API: a worker that dies (out of memory, its node lost) never reports a final
        state there, but its Ray result is ready and raises."""
        import ray

        ready, _ = ray.wait([self.future.wrapped_future], timeout=0)
        return bool(ready)

    def result(self) -> Output:
        output = self.future.result()
        return Output.model_validate(output) if isinstance(output, dict) else output


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
        if hasattr(config, "model_dump"):  # a config object, as the CLI passes; a deployment's is JSON
            config = config.model_dump()
        config = config or {}
        subject = (config.get("name") or config.get("size") or config.get("label") or params.get("preset")
                   or params.get("size") or "default")
        return f"{flow}:{subject} {time.strftime('%m-%d %H:%M:%S')}"

    return name
