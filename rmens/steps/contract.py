"""The step contract: what a step is, declared once beside its function.

    @step("train", devices=1, memory_gib=4, files={"ensemble": "ensemble"})
    def train_step(folder: Path, *, pairs: Output, ensemble: EnsembleConfig, train: TrainConfig) -> dict: ...

- `fn(folder, **inputs) -> summary` writes everything it makes into `folder` (its own, empty unless it
  resumes) and returns a small flat JSON-serialisable summary. Inputs are settings (pydantic configs,
  plain values) and the outputs of earlier steps (rmens.steps.store.Output), whose files it reads through
  `output.file(name)`, never by knowing the other step's layout.
- The code it depends on is its own module and every rmens module that module imports, directly or through
  others (rmens.fingerprint.imported_closure, read from source, so it cannot go stale as a hand-kept list
  would); `code` adds modules or packages it reads without importing them. With the settings and the keys of
  the outputs it reads, their source makes its key.
- `resumable`: an unfinished folder made from the same inputs is handed back to the function (PPO
  continues from its last checkpoint, scoring from its last chunk); otherwise it is computed afresh.
- `resources`: what a runner needs to place it: accelerators it can use and a rough peak memory. A step
  declared `shards=True` may be granted more than one device, and shards its work over them
  (`granted_devices()`, rmens.training.launcher); any other step uses one.
- `files`: the names other steps may ask for, by path inside the folder.
- `reads(**inputs) -> paths`: the files and folders outside the store it reads (data and prompt files, the
  data folder, local model folders); their content is part of its key (rmens.steps.content).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

Summary = dict[str, Any]


@dataclass(frozen=True)
class Resources:
    """What a step needs from the machine that runs it."""

    devices: int = 0  # accelerators it uses when there are some (0: it runs on CPU only)
    memory_gib: float = 2.0  # rough peak host memory at the default sizes
    shards: bool = False  # it may be granted several devices and shard its work over them


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[..., Summary]
    code: tuple[str, ...]
    resumable: bool = False
    resources: Resources = Resources()
    files: Mapping[str, str] = field(default_factory=dict)
    reads: Callable[..., Iterable[str | Path]] | None = None

    def __call__(self, folder: str | Path, /, **inputs: Any) -> Summary:
        return self.fn(Path(folder), **inputs)

    @property
    def modules(self) -> tuple[str, ...]:
        """Every module whose source is part of this step's key."""
        from rmens.fingerprint import imported_closure

        return tuple(sorted({*imported_closure(self.fn.__module__), *self.code}))

    def __hash__(self) -> int:
        return hash(self.name)


# Every declared step by name: an output read back from a store (or Prefect's cache) finds its files here.
DECLARED: dict[str, Step] = {}


def step(name: str, *, code: tuple[str, ...] = (), resumable: bool = False, devices: int = 0,
         memory_gib: float = 2.0, shards: bool = False, files: Mapping[str, str] | None = None,
         reads: Callable[..., Iterable[str | Path]] | None = None) -> Callable[[Callable], Step]:
    """Declare `fn(folder, **inputs) -> summary` as the step `name` (see the module docstring)."""

    def declare(fn: Callable[..., Summary]) -> Step:
        if name in DECLARED and DECLARED[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"two steps are named {name!r}: {DECLARED[name].fn.__module__} and {fn.__module__}")
        declared = Step(name, fn, tuple(code), resumable, Resources(devices, memory_gib, shards),
                        MappingProxyType(dict(files or {})), reads)
        DECLARED[name] = declared
        return declared

    return declare


# Where a running step's metrics go while it runs (training curves): nowhere under the plain runner, to
# MLflow under Prefect. A context variable, so that the library never imports a tracker.
_METRICS: ContextVar[Callable[[int, dict[str, float]], None] | None] = ContextVar("rmens_step_metrics", default=None)


def report_metrics(step_number: int, metrics: dict[str, float]) -> None:
    """A running step's metrics at `step_number` (e.g. a training curve), to whatever tracks the run."""
    sink = _METRICS.get()
    if sink is not None:
        sink(step_number, metrics)


@contextmanager
def metrics_to(sink: Callable[[int, dict[str, float]], None]) -> Iterator[None]:
    """Send the metrics steps report inside the block to `sink`, and on to the sink around the block (the
    runner's progress line, then the tracker)."""
    outer = _METRICS.get()

    def both(step_number: int, metrics: dict[str, float]) -> None:
        sink(step_number, metrics)
        outer(step_number, metrics)

    token = _METRICS.set(sink if outer is None else both)
    try:
        yield
    finally:
        _METRICS.reset(token)


# How many devices the runner granted the step running now (None: as declared, one at most). A context
# variable, as the metrics sink: the library never learns which runner placed it.
_GRANTED: ContextVar[int | None] = ContextVar("rmens_granted_devices", default=None)


def granted_devices() -> int:
    """The devices the running step was granted; a step that shards (rmens.training.launcher) starts one
    process per device when there are more than one."""
    return _GRANTED.get() or 1


@contextmanager
def devices_granted(devices: int | None) -> Iterator[None]:
    """Run the block as a step granted `devices` devices (the runner's placement)."""
    token = _GRANTED.set(devices)
    try:
        yield
    finally:
        _GRANTED.reset(token)
