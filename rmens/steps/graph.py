"""A plan as a graph of calls, and a runner of that graph that starts independent calls at once.

Every call's key is known before anything runs (rmens.steps.store), so walking a plan with a recording
`call` gives each call, its key, the calls whose outputs it reads and whether the store holds it already,
without computing anything. `run_graph` then starts each call as soon as the calls it reads have finished,
through an executor that places it by its declared Resources (Prefect's RayTaskRunner in tasks/, or a
thread pool), and serves a call the store holds without starting anything. `placement` lays the graph out
for a `--dry-run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from rmens.steps.contract import Step
from rmens.steps.store import Output, Store, step_key


@dataclass
class Node:
    """One call of a plan: `step` on `inputs` for `label`, reading the outputs of the calls in `after`."""

    name: str  # step:label, as progress lines and runners name it
    step: Step
    label: str
    tags: dict[str, str] | None
    inputs: dict[str, Any]  # upstream outputs as placeholders (key and folder), resolved before it starts
    key: str
    after: tuple[str, ...]
    found: Output | None = None  # the store's finished output, when it holds one already

    def output(self, store: Store) -> Output:
        """The finished output, or the one a run would make (its key and folder, no summary yet)."""
        return self.found or Output(step=self.step.name, key=self.key, path=str(store.folder(self.step, self.key)))


def _outputs_in(value: Any) -> Iterator[Output]:
    if isinstance(value, Output):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _outputs_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _outputs_in(item)


def resolve(value: Any, finished: dict[str, Output]) -> Any:
    """`value` with every output placeholder replaced by the finished output of its key."""
    if isinstance(value, Output):
        return finished.get(value.key, value)
    if isinstance(value, dict):
        return {k: resolve(v, finished) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, finished) for v in value]
    return value


class Recorder:
    """A plan's `call` that records each call as a Node and hands on a placeholder output; computes nothing."""

    def __init__(self, store: Store, refresh: bool = False):
        self.store = store
        self.refresh = refresh
        self.nodes: dict[str, Node] = {}
        self._by_key: dict[str, str] = {}

    def __call__(self, step: Step, label: str, /, *, tags: dict[str, str] | None = None, **inputs: Any) -> Output:
        key = step_key(step, inputs)
        name = f"{step.name}:{label}"
        if name in self.nodes:
            raise ValueError(f"the plan calls {name} twice; labels must tell calls of one step apart")
        after = tuple(dict.fromkeys(self._by_key[out.key] for out in _outputs_in(inputs) if out.key in self._by_key))
        node = self.nodes[name] = Node(name, step, label, tags, inputs, key, after,
                                       None if self.refresh else self.store.finished(step, key))
        self._by_key[key] = name
        return node.output(self.store)


def record(plan: Callable[..., Any], store: Store, *args: Any, refresh: bool = False,
           **kwargs: Any) -> tuple[dict[str, Node], Any]:
    """(the plan's calls by name, in plan order; what the plan returned, with placeholder outputs)."""
    recorder = Recorder(store, refresh)
    returned = plan(*args, call=recorder, **kwargs)
    return recorder.nodes, returned


class Handle(Protocol):
    def done(self) -> bool: ...

    def result(self) -> Output: ...


@dataclass
class GraphRun:
    """Runs a recorded graph: `submit(node, inputs)` starts a call and returns a handle on it; `reuse(node)` is
    told of each call served from the store; `started(node)` and `ended(node, output, seconds)` of the rest;
    `check()` runs between polls and stops the run by raising."""

    nodes: dict[str, Node]
    submit: Callable[[Node, dict[str, Any]], Handle]
    reuse: Callable[[Node], None] = lambda node: None
    started: Callable[[Node], None] = lambda node: None
    ended: Callable[[Node, Output, float], None] = lambda node, output, seconds: None
    check: Callable[[], None] = lambda: None  # raises to stop at once (a signal's stop the runner noticed)
    poll_s: float = 0.2
    finished: dict[str, Output] = field(default_factory=dict)  # by key
    overlap: int = 0  # the most calls that were running at once

    def run(self) -> dict[str, Output]:
        """Every call's finished output, by name. A failed call stops the run once the calls already running
        have ended (their outputs are kept in the store), and its error is raised."""
        waiting = list(self.nodes.values())
        running: dict[str, tuple[Node, Handle, float]] = {}
        outputs: dict[str, Output] = {}
        failure: BaseException | None = None
        while waiting or running:
            self.check()
            for node in [n for n in waiting if failure is None and all(a in outputs for a in n.after)]:
                waiting.remove(node)
                if node.found is not None:
                    outputs[node.name] = self.finished[node.key] = node.found
                    self.reuse(node)
                    continue
                self.started(node)
                running[node.name] = (node, self.submit(node, resolve(node.inputs, self.finished)), time.monotonic())
            self.overlap = max(self.overlap, len(running))
            if failure is not None and not running:
                raise failure
            done = [name for name, (_, handle, _) in running.items() if handle.done()]
            if not done:
                time.sleep(self.poll_s)
            for name in done:
                node, handle, since = running.pop(name)
                try:
                    output = handle.result()
                except BaseException as exc:  # noqa: BLE001 - raised once the others have ended
                    failure = failure or exc
                    continue
                outputs[name] = self.finished[node.key] = output
                self.ended(node, output, time.monotonic() - since)
        return outputs


def waves(nodes: dict[str, Node]) -> list[list[Node]]:
    """The calls in order of depth: each wave's calls read only earlier waves' outputs, so they can run at once."""
    depth: dict[str, int] = {}
    for node in nodes.values():  # plan order puts a call after the calls it reads
        depth[node.name] = 1 + max((depth[a] for a in node.after), default=-1)
    grouped: dict[int, list[Node]] = {}
    for node in nodes.values():
        grouped.setdefault(depth[node.name], []).append(node)
    return [grouped[d] for d in sorted(grouped)]


def placement(nodes: dict[str, Node], notes: dict[str, str] | None = None,
              request: Callable[[Node], tuple[int, float]] | None = None) -> list[str]:
    """The lines of a dry run: per wave, each call with the devices and host memory it asks for (`request`,
    default its step's declaration), or that the store holds it already (so it starts nothing), and a note per
    call (e.g. its accelerator memory)."""
    notes = notes or {}
    request = request or (lambda node: (node.step.resources.devices, node.step.resources.memory_gib))
    lines = []
    for number, wave in enumerate(waves(nodes), 1):
        todo = [n for n in wave if n.found is None]
        lines.append(f"wave {number}: {len(wave)} call(s), {len(todo)} to compute, asking for at most "
                     f"{sum(request(n)[0] for n in todo)} device(s) at once")
        for node in wave:
            devices, memory = request(node)
            state = "in the store" if node.found is not None else f"{devices} device(s), {memory:g} GiB host"
            note = f"  {notes[node.name]}" if node.name in notes else ""
            lines.append(f"  {node.name:<44} {state}{note}")
    return lines
