"""The reference experiment in-process, over the library alone (no Prefect, no MLflow).

    <out>/experiment.json          marks the folder as this runner's (it never writes into another one)
    <out>/steps/<step>-<label>/    one folder per step; done.json (written last) holds its input key
    <out>/logged_bon.json, report.md, results.json, ...   the results, copied from the report step

A step is reused when its folder holds done.json with the same input key (its settings, the keys of the
steps it reads and the source of the library code that computes it), and computed again from scratch
otherwise; PPO instead resumes from its last checkpoint, and scoring from its last saved chunk, when
their inputs are unchanged. So an interrupted run, or a second call for the PPO part, continues where
the last one stopped.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmens.experiment.config import ExperimentConfig
from rmens.experiment.data import check_inputs, source_fingerprints
from rmens.experiment.plan import RESUMABLE, STEP_CODE, Part, run_plan
from rmens.experiment.steps import STEPS
from rmens.fingerprint import canonical, digest, source_fingerprint
from rmens.io import atomic_write_text, file_manifest, manifest_changes, refuse_foreign_folder

log = logging.getLogger(__name__)

MARKER = "experiment.json"


@dataclass(frozen=True)
class StepOutput:
    folder: Path
    key: str


def _resolve(value: Any) -> Any:
    """Handles become the folders the library steps read."""
    if isinstance(value, StepOutput):
        return value.folder
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    return value


def _identify(value: Any) -> Any:
    return {"step_key": value.key} if isinstance(value, StepOutput) else None


def input_key(step: str, inputs: dict[str, Any]) -> str:
    """The step's inputs (settings, and the keys of the steps it reads) and the source of its code."""
    return digest({"step": step, "inputs": canonical(inputs, _identify), "code": source_fingerprint(STEP_CODE[step])})


class LocalSteps:
    """Executes plan steps in folders under `out`, reusing complete ones."""

    def __init__(self, out: Path):
        self.out = out
        self.computed: list[str] = []
        self.reused: list[str] = []

    def __call__(self, step: str, label: str, /, **inputs: Any) -> StepOutput:
        key = input_key(step, inputs)
        name = f"{step}:{label}"
        folder = self.out / "steps" / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{step}-{label}")
        done = _read(folder / "done.json")
        if done.get("key") == key:
            changes = manifest_changes(folder, done.get("files", {}))
            if not changes:
                self.reused.append(name)
                log.info("%-32s reused", name)
                return StepOutput(folder, key)
            log.warning("%-32s changed since it was made (%s): recomputing", name, "; ".join(changes[:3]))
            shutil.rmtree(folder)
        if folder.exists() and not (step in RESUMABLE and _read(folder / "started.json").get("key") == key):
            shutil.rmtree(folder)  # incomplete, or made from other inputs: this runner's own folder
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "started.json", json.dumps({"key": key}))
        log.info("%-32s started", name)
        start = time.perf_counter()
        summary = STEPS[step](folder, **_resolve(inputs))
        seconds = time.perf_counter() - start
        files = file_manifest(folder, skip=("done.json", "started.json"))
        atomic_write_text(folder / "done.json", json.dumps({"key": key, "wall_s": seconds, "summary": summary,
                                                            "files": files}, indent=2))
        self.computed.append(name)
        log.info("%-32s done in %.1f s", name, seconds)
        return StepOutput(folder, key)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def claim_output(out: str | Path, cfg: ExperimentConfig) -> Path:
    """The output folder, made or confirmed as this runner's; a non-empty folder it did not make is refused."""
    out = Path(out).expanduser().resolve()
    refuse_foreign_folder(out, (out / MARKER).is_file(), f"an rmens experiment folder (no {MARKER})",
                          "choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MARKER, json.dumps({"format": "rmens-experiment", "size": cfg.size,
                                                "config": cfg.model_dump(mode="json")}, indent=2))
    return out


def publish(report_folder: Path, out: Path) -> list[Path]:
    """Copy the report step's files (results, tables, curves) to the top of the output folder."""
    copied = []
    for path in sorted(report_folder.iterdir()):
        if path.name in ("done.json", "started.json"):
            continue
        if path.is_dir():
            shutil.copytree(path, out / path.name, dirs_exist_ok=True)
        else:
            shutil.copy2(path, out / path.name)
        copied.append(out / path.name)
    return copied


def run_experiment(cfg: ExperimentConfig, out: str | Path, part: Part = "all") -> dict:
    """Run (or resume) the experiment in `out`; returns where the results are and what was computed."""
    check_inputs(cfg.data, cfg.pools.judges, cfg.mt_bench)
    out = claim_output(out, cfg)
    steps = LocalSteps(out)
    start = time.perf_counter()
    report = run_plan(cfg, steps, part, source_fingerprints(cfg.data, cfg.mt_bench))
    publish(report.folder, out)
    return {"out": str(out), "report": str(out / "report.md"), "logged_bon": str(out / "logged_bon.json"),
            "computed": steps.computed, "reused": steps.reused, "wall_s": time.perf_counter() - start}
