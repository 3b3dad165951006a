"""A pipeline's comparison report where people look: Prefect artifacts of the flow run and files of its
MLflow parent run (every flow run leaves them, cached or not)."""

from __future__ import annotations

import json

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from rmens.pipeline.comparison import headline_metrics, long_table, stage_tables
from rmens.steps import Output
from tasks.runtime.tracking import StageContext, client_for, log_metrics

PARENT_FILES = ("report.md", "summary.csv", "train_overlay.png", "bon_overlay.png", "ppo_overlay.png")


def publish(ctx: StageContext, report: Output, title: str) -> None:
    markdown = report.file("report").read_text()
    rows = json.loads(report.file("rows").read_text())
    create_markdown_artifact(markdown=markdown, key="rmens-report", description=title)
    for stage, table in stage_tables(rows).items():
        # Prefect takes a table's columns from its first row: every row of a stage carries its stage's columns.
        create_table_artifact(table=table, key=f"rmens-{stage.replace('_', '-')}",
                              description=f"{title}: {stage}, every output and its numbers")
    if ctx.parent_run_id:
        client = client_for(ctx)
        log_metrics(client, ctx.parent_run_id, headline_metrics(rows))
        for name in PARENT_FILES:
            if (report.folder / name).is_file():
                client.log_artifact(ctx.parent_run_id, str(report.folder / name))
        # MLflow's table logging: the parent run's Artifacts tab shows it as a sortable, filterable table.
        client.log_table(ctx.parent_run_id, data=long_table(rows), artifact_file="comparison.json")
