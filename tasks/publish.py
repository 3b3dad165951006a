"""A pipeline's comparison report where people look: Prefect artifacts of the flow run and files of its
MLflow parent run (every flow run leaves them, cached or not)."""

from __future__ import annotations

import json

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from rmens.pipeline.comparison import headline_metrics, long_table, stage_tables
from rmens.steps import Output
from tasks.runtime.tracking import VIEW_TAG, StageContext, client_for, log_metrics

PARENT_FILES = ("report.md", "summary.csv", "train_overlay.png", "bon_overlay.png", "ppo_overlay.png")
VIEW_COLUMNS = ("evaluate.win_rate/", "train_ensemble.val_accuracy/")  # the rest: Columns, or the chart view
MAX_TAG_CHARS = 5000  # MLflow's limit on an experiment tag's value


def runs_table_view(metrics: list[str]) -> str:
    """The runs table's shared view (tasks.runtime.tracking.SHARED_VIEW): the headline metrics (win rates
    first) as its columns, as many as the tag holds."""
    columns = [f"metrics.`{name}`" for prefix in VIEW_COLUMNS for name in sorted(metrics) if name.startswith(prefix)]
    while True:
        # wide enough to read a name like evaluate.win_rate/bon:linear-k3-r0/lcb1:n4
        state = json.dumps({"selectedColumns": columns, "columnWidths": {column: 290 for column in columns},
                            "runsExpanded": {}})
        if len(state) <= MAX_TAG_CHARS:
            return state
        columns.pop()


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
        headline = headline_metrics(rows)
        log_metrics(client, ctx.parent_run_id, headline)
        client.set_experiment_tag(ctx.experiment_id, VIEW_TAG, runs_table_view(list(headline)))
        for name in PARENT_FILES:
            if (report.folder / name).is_file():
                client.log_artifact(ctx.parent_run_id, str(report.folder / name))
        # MLflow's table logging: the parent run's Artifacts tab shows it as a sortable, filterable table.
        client.log_table(ctx.parent_run_id, data=long_table(rows), artifact_file="comparison.json")
