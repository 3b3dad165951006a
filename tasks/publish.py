"""A pipeline's comparison report where people look: Prefect artifacts of the flow run and files of its
MLflow parent run (every flow run leaves them, cached or not)."""

from __future__ import annotations

import json

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from rmens.pipeline.comparison import comparison_table
from rmens.steps import Output
from tasks.runtime.tracking import StageContext, client_for

PARENT_FILES = ("report.md", "summary.csv", "train_overlay.png", "bon_overlay.png", "ppo_overlay.png")


def publish(ctx: StageContext, report: Output, title: str) -> None:
    markdown = report.file("report").read_text()
    rows = json.loads(report.file("rows").read_text())
    create_markdown_artifact(markdown=markdown, key="rmens-report", description=title)
    table = comparison_table(rows)
    # Prefect takes a table's columns from its first row: every row carries every column.
    create_table_artifact(table=table, key="rmens-arms", description=f"{title}: every step output and its numbers")
    if ctx.parent_run_id:
        client = client_for(ctx)
        for name in PARENT_FILES:
            if (report.folder / name).is_file():
                client.log_artifact(ctx.parent_run_id, str(report.folder / name))
        # MLflow's table logging: the parent run's Artifacts tab shows it as a sortable table.
        client.log_table(ctx.parent_run_id, data={k: [row[k] for row in table] for k in table[0]} if table else {},
                         artifact_file="comparison.json")
