"""The reference experiment in-process, over the library alone (no Prefect, no MLflow).

    <out>/experiment.json          marks the folder as this runner's (it never writes into another one)
    <out>/artifacts/<step>/<key>/  one folder per step call (rmens.steps.store); done.json is written last
    <out>/logged_bon.json, report.md, results.json, ...   the results, copied from the report step

A step is reused when its folder is finished for the same key (its settings, the keys of the steps it
reads and the source of the library code that computes it) and intact, and computed again otherwise;
PPO resumes from its last checkpoint, and scoring from its last saved chunk. So an interrupted run, or a
second call for the PPO part, continues where the last one stopped.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rmens.experiment.config import ExperimentConfig
from rmens.experiment.data import check_inputs, source_fingerprints
from rmens.experiment.plan import Part, run_plan
from rmens.io import refuse_foreign_folder, write_json
from rmens.steps.runner import LocalRunner, check
from rmens.steps.store import DONE, STARTED, Store

MARKER = "experiment.json"


def claim_output(out: str | Path, cfg: ExperimentConfig) -> Path:
    """The output folder, made or confirmed as this runner's; a non-empty folder it did not make is refused."""
    out = Path(out).expanduser().resolve()
    refuse_foreign_folder(out, (out / MARKER).is_file(), f"an rmens experiment folder (no {MARKER})",
                          "choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MARKER, {"format": "rmens-experiment", "size": cfg.size, "config": cfg.model_dump(mode="json")})
    return out


def publish(report_folder: Path, out: Path) -> list[Path]:
    """Copy the report step's files (results, tables, curves) to the top of the output folder."""
    copied = []
    for path in sorted(report_folder.iterdir()):
        if path.name in (DONE, STARTED):
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
    store, sources = Store.of_project(out), source_fingerprints(cfg.data, cfg.mt_bench)
    steps = LocalRunner(store, total=len(check(run_plan, store, cfg, part=part, sources=sources).outputs),
                        resources=cfg.resources)
    start = time.perf_counter()
    report = run_plan(cfg, steps, part, sources)
    publish(report.folder, out)
    return {"out": str(out), "report": str(out / "report.md"), "logged_bon": str(out / "logged_bon.json"),
            "computed": steps.computed, "reused": steps.reused, "wall_s": time.perf_counter() - start}
