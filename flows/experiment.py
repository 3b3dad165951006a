"""The reference experiment as a Prefect flow: every step of rmens.experiment.plan a cached task with one
MLflow child run, the results (logged_bon.json, report.md, results.json, curves) copied to the output
folder and attached to the flow's MLflow run and Prefect artifacts."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.entry import entry_point
from rmens.experiment.config import ExperimentConfig, load_experiment
from rmens.experiment.data import check_inputs, source_fingerprints
from rmens.experiment.plan import Part, run_plan
from rmens.experiment.runner import claim_output, publish
from rmens.io import check_writable
from rmens.models.context import check_max_lengths
from rmens.steps import Store
from rmens.steps.runner import check
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.stager import Stager, flow_run_name, flow_run_tags
from tasks.runtime.tracking import client_for, parent_run


@flow(name="rmens-experiment", flow_run_name=flow_run_name("experiment"), validate_parameters=False)
@entry_point
def experiment(config: ExperimentConfig | None = None, size: str = "tiny", overrides: list[str] | None = None,
               out: str | None = None, part: Part = "all", refresh: bool = False) -> dict:
    """Give a full `config`, or a `size` with dotted `overrides`. `out` (default runs/experiment-<size>)
    holds the MLflow store, the artifacts and the published results."""
    config = config or load_experiment(size, overrides)
    out = out or f"runs/experiment-{config.size}"
    check_inputs(config.data, config.pools.judges, config.mt_bench)
    check_writable(out, "out")
    check_max_lengths(config.trained_ensembles())
    root = claim_output(out, config)
    paths = ProjectPaths.at(root).make()
    sources = source_fingerprints(config.data, config.mt_bench)
    total = len(check(run_plan, Store(paths.artifacts), config, part=part, sources=sources).outputs)
    with parent_run(paths, f"experiment:{config.size}", config, tags=flow_run_tags()) as ctx, \
            Stager(ctx, refresh, total=total, resources=config.resources) as stage:
        report = stage.run_plan(run_plan, config, part=part, sources=sources)
        published = publish(report.require().folder, root)
        client = client_for(ctx)
        for path in published:
            if path.is_file() and path.suffix in (".md", ".json", ".png", ".csv"):
                client.log_artifact(ctx.parent_run_id, str(path))
        create_markdown_artifact(markdown=(root / "report.md").read_text(), key="rmens-experiment",
                                 description=f"reference experiment, size {config.size}")
    return {"out": str(root), "report": str(root / "report.md"), "logged_bon": str(root / "logged_bon.json"),
            "parent_run_id": ctx.parent_run_id, "states": stage.states}
