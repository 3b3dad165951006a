"""Stage: one table comparing every arm, as Prefect artifacts, MLflow artifacts of the parent run and files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.runtime.refs import ArtifactRef
from tasks.runtime.stage import run_stage, stage_task
from tasks.runtime.tracking import StageContext, client_for


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


# The columns the markdown report shows per stage (summary.csv keeps everything).
REPORT_COLUMNS = {
    "prepare_data": ["n_train", "n_val", "flipped"],
    "train_ensemble": ["val_accuracy", "val_member_accuracy_mean", "val_ece", "val_agreement_longer_lost",
                       "val_length_rule_agreement", "val_margin_std", "steps", "train_wall_s", "param_mib"],
    "best_of_n": ["judge_at_N", "judge_gain", "proxy_at_N"],
    "ppo": ["final_reward", "final_kl", "final_judge", "ppo_wall_s"],
    "evaluate": ["win_rate", "win_rate_se", "lc_win_rate", "mt_bench_score", "mt_bench_turn_1", "mt_bench_turn_2",
                 "avg_output_chars"],
}


def rows_from(refs: dict[str, ArtifactRef]) -> list[dict]:
    """One row per artifact (per arm and rule for Best-of-n): label, stage, numbers, folder."""
    rows = []
    for label, ref in refs.items():
        values = {k: v for k, v in ref.summary.items() if isinstance(v, (int, float, str))}
        if ref.stage == "best_of_n":  # keys are "<arm>/<rule>/<metric>"
            arms: dict[str, dict] = {}
            for key, value in values.items():
                name, _, metric = key.rpartition("/")
                arms.setdefault(name, {})[metric] = value
            rows += [{"label": name, "stage": ref.stage, **metrics, "artifact": ref.path}
                     for name, metrics in arms.items()]
        else:
            rows.append({"label": label, "stage": ref.stage, **values, "artifact": ref.path})
    return rows


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
            present = {k for r in stage_rows for k in r}
            keys = [k for k in REPORT_COLUMNS.get(stage, sorted(present - {"label", "stage", "artifact"}))
                    if k in present]
            lines += [f"## {stage}", "", "| label | " + " | ".join(keys) + " |",
                      "|---|" + "---|" * len(keys)]
            lines += ["| " + r["label"] + " | " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |"
                      for r in stage_rows]
            lines.append("")
        figures = overlay_figures(refs, folder)
        lines += [f"![{name}]({name})" for name in figures]
        (folder / "report.md").write_text("\n".join(lines))
        (folder / "rows.json").write_text(json.dumps(rows, indent=2))
        return {"rows": len(rows)}

    return run_stage(ctx, "report", {"title": title, "refs": refs}, build)


def overlay_figures(refs: dict[str, ArtifactRef], folder: Path) -> list[str]:
    """Every arm in one figure: training loss by step, Best-of-n (proxy and judge against KL_bon) and PPO
    (judge and proxy against KL)."""
    from rmens.evaluation.overlay import plot_bon_overlay, plot_ppo_overlay, plot_train_overlay

    made = []
    trained = {label: ref.folder / "ensemble" / "train_metrics.json" for label, ref in refs.items()
               if ref.stage == "train_ensemble"}
    histories = {label: [row for phase in json.loads(path.read_text())["history"].values() for row in phase]
                 for label, path in trained.items() if path.is_file()}
    if plot_train_overlay(histories, folder / "train_overlay.png"):
        made.append("train_overlay.png")
    bon = [ref for ref in refs.values() if ref.stage == "best_of_n"]
    if bon and plot_bon_overlay(json.loads((bon[0].folder / "bon_curves.json").read_text()),
                                folder / "bon_overlay.png"):
        made.append("bon_overlay.png")
    ppo = {label.removeprefix("eval:ppo:"): json.loads((ref.folder / "ppo_points.json").read_text())
           for label, ref in refs.items() if (ref.folder / "ppo_points.json").is_file()}
    if plot_ppo_overlay(ppo, folder / "ppo_overlay.png"):
        made.append("ppo_overlay.png")
    return made


def publish(ctx: StageContext, ref: ArtifactRef, title: str) -> None:
    """Every flow run (cached or not) leaves the report as Prefect artifacts and on its MLflow parent run."""
    markdown = (ref.folder / "report.md").read_text()
    rows = json.loads((ref.folder / "rows.json").read_text())
    create_markdown_artifact(markdown=markdown, key="rmens-report", description=title)
    table = comparison_table(rows)
    # Prefect takes a table's columns from its first row: every row carries every column.
    create_table_artifact(table=table, key="rmens-arms", description=f"{title}: every stage output and its numbers")
    if ctx.parent_run_id:
        client = client_for(ctx)
        for name in ("report.md", "summary.csv", "train_overlay.png", "bon_overlay.png", "ppo_overlay.png"):
            if (ref.folder / name).is_file():
                client.log_artifact(ctx.parent_run_id, str(ref.folder / name))
        # MLflow's table logging: the parent run's Artifacts tab shows it as a sortable table.
        client.log_table(ctx.parent_run_id, data={k: [row[k] for row in table] for k in table[0]} if table else {},
                         artifact_file="comparison.json")


def comparison_table(rows: list[dict]) -> list[dict[str, str]]:
    """One row per stage output (label, stage, then every number any of them has), formatted."""
    columns = ["label", "stage", *sorted({k for r in rows for k in r} - {"label", "stage", "artifact"})]
    return [{k: _fmt(r.get(k, "")) for k in columns} for r in rows]
