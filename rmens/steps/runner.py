"""The plain runner: a plan's steps in this process over a Store, with no Prefect and no MLflow; and
`check`, which keys a plan against a store without computing anything (is a re-run up to date?).

A plan is a function that calls `call(step, label, /, *, tags=None, **inputs)` for each of its steps in
order and hands each returned Output to the steps that read it (rmens.pipeline.plan,
rmens.experiment.plan). `label` names the call (the arm or role it is for) in progress lines and
tracking runs; `tags` are what a tracker groups runs by. Neither enters the key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rmens.steps.contract import Step, devices_granted, metrics_to
from rmens.steps.graph import record
from rmens.steps.resources_config import StepResources, call_devices
from rmens.steps.store import Output, Store

# One line per step as it starts and ends (the CLI gives this logger its console handler).
progress = logging.getLogger("rmens.progress")


class Call(Protocol):
    def __call__(self, step: Step, label: str, /, *, tags: dict[str, str] | None = None, **inputs: Any) -> Output: ...


class Progress:
    """The console line of each call as it starts and ends, with its place in the plan and the time since the
    run began: `[ 3/28 0:41] train_ensemble:linear-k3   started` (the total when the runner was told it)."""

    # A long step says how far it is at most this often (seconds), from the metrics it reports as it runs.
    interval = 30.0

    def __init__(self, total: int | None = None):
        self.total = total
        self.count = 0
        self.start = time.monotonic()

    def working(self, name: str) -> Callable[[int, dict[str, float]], None]:
        """A metrics sink (rmens.steps.metrics_to) that logs `... name   at step 120 (train/loss 0.613)` when
        the call has been quiet for `interval` seconds: a long training, sampling or PPO step shows it moves."""
        last = time.monotonic()

        def sink(step_number: int, metrics: dict[str, float]) -> None:
            nonlocal last
            if time.monotonic() - last < self.interval:
                return
            last = time.monotonic()
            shown = ", ".join(f"{key} {value:.4g}" for key, value in list(metrics.items())[:2])
            progress.info("%s %-40s at step %d%s", self._where(), name, step_number, f" ({shown})" if shown else "")

        return sink

    def started(self, name: str, how: str = "started") -> None:
        self.count += 1
        progress.info("%s %-40s %s", self._where(), name, how)

    def ended(self, name: str, how: str) -> None:
        progress.info("%s %-40s %s", self._where(), name, how)

    def _where(self) -> str:
        minutes, seconds = divmod(int(time.monotonic() - self.start), 60)
        place = f"{self.count:>{len(str(self.total))}}/{self.total}" if self.total else str(self.count)
        return f"[{place} {minutes}:{seconds:02d}]"


class LocalRunner:
    """Executes plan calls in-process, reusing finished outputs from `store`; `total`, the plan's number of
    calls (len(check(...).outputs)), numbers the progress lines; `resources` (rmens.steps.resources_config), the
    devices each call is given: a training step given several shards over them."""

    def __init__(self, store: Store, refresh: bool = False, total: int | None = None,
                 resources: dict[str, StepResources] | None = None):
        self.store = store
        self.resources = resources or {}
        self.refresh = refresh
        self.progress = Progress(total)
        self.computed: list[str] = []
        self.reused: list[str] = []
        self.outputs: dict[str, Output] = {}  # step:label -> output, in the order they ran

    def __call__(self, step: Step, label: str, /, *, tags: dict[str, str] | None = None, **inputs: Any) -> Output:
        name = f"{step.name}:{label}"
        self.progress.started(name)
        with metrics_to(self.progress.working(name)), devices_granted(call_devices(name, step, self.resources)):
            output, computed = self.store.run(step, inputs, refresh=self.refresh)
        (self.computed if computed else self.reused).append(name)
        self.outputs[name] = output
        self.progress.ended(name, f"computed in {output.wall_s:.1f} s" if computed else "reused")
        return output


@dataclass
class Check:
    """A plan keyed against a store, computing nothing (rmens.steps.graph.record): `outputs`, every call's found
    or expected output by name; `missing`, the calls a run would compute. Downstream keys need only upstream
    keys, so a missing output still keys the rest."""

    outputs: dict[str, Output]
    missing: list[str]


def check(plan, store: str | Path | Store, *args: Any, **kwargs: Any) -> Check:
    """Walk `plan(*args, call=..., **kwargs)` against `store` without computing anything."""
    store = store if isinstance(store, Store) else Store(store)
    nodes, _ = record(plan, store, *args, **kwargs)
    return Check({name: node.output(store) for name, node in nodes.items()},
                 [name for name, node in nodes.items() if node.found is None])
