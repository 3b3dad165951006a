"""Stage: one table comparing every arm, as Prefect artifacts, MLflow artifacts of the parent run and files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common import run_stage, stage_task
from tasks.refs import ArtifactRef
from tasks.tracking import StageContext, client_for


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def rows_from(refs: dict[str, ArtifactRef]) -> list[dict]:
    """One row per artifact: its label, stage, folder and the numbers it summarised."""
    return [{"label": label, "stage": ref.stage, **{k: v for k, v in ref.summary.items()
                                                    if isinstance(v, (int, float, str))}, "artifact": ref.path}
            for label, ref in refs.items()]


@stage_task("report", timeout_seconds=600)
def report(ctx: StageContext, title: str, refs: dict[str, ArtifactRef]) -> ArtifactRef:
    def build(folder: Path, run_id: str) -> dict:
        rows = rows_from(refs)
        columns = sorted({k for row in rows for k in row} - {"label", "stage", "artifact"})
        with (folder / "summary.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["label", "stage", *columns, "artifact"])
            writer.writeheader()
            writer.writerows(rows)
        lines = [f"# {title}", "", f"MLflow parent run: `{ctx.parent_run_id}`", ""]
        for stage in dict.fromkeys(r["stage"] for r in rows):
            stage_rows = [r for r in rows if r["stage"] == stage]
            keys = sorted({k for r in stage_rows for k in r} - {"label", "stage", "artifact"})
            lines += [f"## {stage}", "", "| label | " + " | ".join(keys) + " |",
                      "|---|" + "---|" * len(keys)]
            lines += ["| " + r["label"] + " | " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |"
                      for r in stage_rows]
            lines.append("")
        (folder / "report.md").write_text("\n".join(lines))
        (folder / "rows.json").write_text(json.dumps(rows, indent=2))
        return {"rows": len(rows)}

    return run_stage(ctx, "report", {"title": title, "refs": refs}, build)


def publish(ctx: StageContext, ref: ArtifactRef, title: str) -> None:
    """Every flow run (cached or not) leaves the report as Prefect artifacts and on its MLflow parent run."""
    markdown = (ref.folder / "report.md").read_text()
    rows = json.loads((ref.folder / "rows.json").read_text())
    create_markdown_artifact(markdown=markdown, key="rmens-report", description=title)
    create_table_artifact(table=[{k: _fmt(v) for k, v in r.items()} for r in rows], key="rmens-arms",
                          description=f"{title}: every stage output and its numbers")
    if ctx.parent_run_id:
        client = client_for(ctx)
        for name in ("report.md", "summary.csv"):
            client.log_artifact(ctx.parent_run_id, str(ref.folder / name))
