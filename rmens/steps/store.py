"""The one store of step outputs: a key per step call, a folder per key, a completion marker, one rule
for reuse and resume. Every runner (the plain one, Prefect's) goes through `Store.run`.

    <root>/<step>/<key[:16]>/          the step's folder
        started.json                   the key it was started with
        ...                            what the step wrote
        done.json                      written last: key, summary, wall time, the tracking run, a manifest

A call is reused when its folder holds done.json for the same key and every file still matches the
manifest; a folder whose files changed since is computed again (with a warning); an unfinished folder is
continued when the step is resumable and was started with the same key, else cleared and computed afresh.
The key covers the step's settings, the keys of the outputs it reads and the source of its code (its
module and everything that imports, rmens.fingerprint), so it is known before anything runs: a plan can
be checked against the store without computing anything (rmens.steps.runner.check).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from rmens.fingerprint import canonical, closure_fingerprint, digest, source_fingerprint
from rmens.io import Manifest, file_manifest, manifest_changes, write_json
from rmens.steps.content import content_digests
from rmens.steps.contract import DECLARED, Step, Summary

log = logging.getLogger(__name__)

DONE, STARTED = "done.json", "started.json"


class Output(BaseModel):
    """A finished step's folder and what it said about it: what runners pass on and Prefect caches."""

    step: str = Field(description="The declared step's name.")
    key: str = Field(description="The call's key: settings, the keys of the outputs it read, its code.")
    path: str = Field(description="Its folder, <store>/<step>/<key[:16]>.")
    summary: Summary = Field(default_factory=dict, description="What the step returned (flat, JSON).")
    wall_s: float | None = Field(None, description="Seconds the step took when it was computed.")
    run_id: str | None = Field(None, description="The tracking (MLflow) run that computed it, when one did.")
    files: Manifest = Field(default_factory=dict, repr=False,
                            description="Size, mtime and sha256 of every file it wrote, checked before a reuse.")

    @property
    def folder(self) -> Path:
        return Path(self.path)

    def file(self, name: str) -> Path:
        """The file (or folder) the step declared as `name`."""
        declared = DECLARED[self.step].files
        if name not in declared:
            raise KeyError(f"step {self.step!r} declares no file {name!r} (it declares {sorted(declared)})")
        return self.folder / declared[name]

    def __fspath__(self) -> str:  # reading helpers beside the step that wrote them take the output as a folder
        return self.path

    def require(self) -> Output:
        if not (self.folder / DONE).is_file():
            raise FileNotFoundError(f"the {self.step} output {self.path} is gone; run again (with --refresh "
                                    "if a cached run keeps pointing at it)")
        return self


def _identify(value: Any) -> Any:
    return {"step_key": value.key} if isinstance(value, Output) else None


def step_key(step: Step, inputs: dict[str, Any]) -> str:
    """The key of a call: the step, its inputs (settings, and the keys of the outputs it reads), its code, and
    the content of the files outside the store that it reads."""
    code = [closure_fingerprint(step.fn.__module__), source_fingerprint(step.code) if step.code else ""]
    key = {"step": step.name, "inputs": canonical(inputs, _identify), "code": code}
    if step.reads is not None:  # files outside the store, by what they hold now
        key["reads"] = content_digests(step.reads(**inputs))
    return digest(key)


def _present(value: Any) -> Any:
    """Inputs as a step function receives them: outputs stay handles, checked to be still there."""
    if isinstance(value, Output):
        return value.require()
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items()}
    return value


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# A context around a computation, yielding the id of the tracking run it records into (or None).
Around = Callable[[Step, Path], AbstractContextManager[str | None]]


def _untracked(step: Step, folder: Path) -> AbstractContextManager[str | None]:
    return nullcontext(None)


class Store:
    """Step outputs under one root folder: a project's (or an experiment's) `artifacts`."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    @classmethod
    def of_project(cls, project: str | Path) -> Store:
        """The store of a project folder, wherever it is run from (plain runner or Prefect)."""
        return cls(Path(project) / "artifacts")

    def folder(self, step: Step, key: str) -> Path:
        return self.root / step.name / key[:16]

    def finished(self, step: Step, key: str) -> Output | None:
        """The output of this call when its folder is complete and intact, else None (and why, logged)."""
        folder = self.folder(step, key)
        done = _read(folder / DONE)
        if done.get("key") != key:
            return None
        changes = manifest_changes(folder, done.get("files", {}))
        if changes:
            log.warning("%s: %s changed since it was made (%s): computing it again", step.name, folder,
                        "; ".join(changes[:3]))
            return None
        return Output(step=step.name, key=key, path=str(folder), summary=done.get("summary", {}),
                      wall_s=done.get("wall_s"), run_id=done.get("run_id"), files=done.get("files", {}))

    def run(self, step: Step, inputs: dict[str, Any], *, key: str | None = None, refresh: bool = False,
            around: Around = _untracked, after: Callable[[Output], None] | None = None) -> tuple[Output, bool]:
        """(output, computed): the finished output of this call, reused or computed now. `around` wraps the
        computation (a tracking run); `after(output)` runs inside it once the step has returned, before
        done.json is written."""
        key = key or step_key(step, inputs)
        if not refresh:
            found = self.finished(step, key)
            if found is not None:
                return found, False
        folder = self.folder(step, key)
        resume = step.resumable and not refresh and _read(folder / STARTED).get("key") == key
        if folder.exists() and not resume:
            shutil.rmtree(folder)  # unfinished, changed, or asked to recompute: the store's own folder
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / STARTED, {"key": key, "step": step.name})
        with around(step, folder) as run_id:
            start = time.perf_counter()
            summary = step(folder, **_present(inputs))
            # JSON (done.json, Prefect's result store) has no NaN: "not available" is None from the start.
            summary = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}
            (folder / DONE).unlink(missing_ok=True)
            files = file_manifest(folder, skip=(DONE, STARTED, DONE + ".partial"))
            output = Output(step=step.name, key=key, path=str(folder), summary=summary,
                            wall_s=time.perf_counter() - start, run_id=run_id, files=files)
            if after is not None:  # what a tracker records (it may add to the summary); a failure leaves no done.json
                after(output)
            write_json(folder / DONE, output.model_dump(mode="json", exclude={"path"}))
        return output, True
