"""Pipeline step: one table comparing every arm (report.md, summary.csv, rows.json) and overlay figures."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from rmens.io import atomic_write_text, write_json
from rmens.steps import Output, step


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


# The columns the markdown report shows per stage (summary.csv keeps everything).
REPORT_COLUMNS = {
    "prepare_data": ["n_train", "n_val", "flipped"],
    "train_ensemble": ["val_accuracy", "val_member_accuracy_mean", "val_ece", "val_agreement_longer_lost",
                       "val_length_rule_agreement", "val_margin_std", "steps", "train_wall_s", "param_mib"],
    "best_of_n": ["gold_at_N", "gold_gain", "proxy_at_N"],
    "ppo": ["final_reward", "final_kl", "final_gold", "ppo_wall_s"],
    "evaluate": ["win_rate", "win_rate_se", "lc_win_rate", "mt_bench_score", "mt_bench_turn_1", "mt_bench_turn_2",
                 "avg_output_chars"],
}


def rows_from(outputs: dict[str, Output]) -> list[dict]:
    """One row per artifact (per arm run and rule for Best-of-n): label, stage, numbers, folder."""
    rows = []
    for label, ref in outputs.items():
        values = {k: v for k, v in ref.summary.items() if isinstance(v, (int, float, str))}
        if ref.step == "best_of_n":  # keys are "<metric>/<arm run>/<rule>"
            arms: dict[str, dict] = {}
            for key, value in values.items():
                metric, _, name = key.partition("/")
                arms.setdefault(name, {})[metric] = value
            rows += [{"label": name, "stage": ref.step, **metrics, "artifact": ref.path}
                     for name, metrics in arms.items()]
        else:
            rows.append({"label": label, "stage": ref.step, **values, "artifact": ref.path})
    return rows


@step("report", files={"report": "report.md", "rows": "rows.json"})
def report(folder: Path, *, title: str, outputs: dict[str, Output]) -> dict:
    """Every output's summary as one comparison: a markdown table per step, a CSV with everything."""
    rows = rows_from(outputs)
    columns = sorted({k for row in rows for k in row} - {"label", "stage", "artifact"})
    with (folder / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["label", "stage", *columns, "artifact"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", ""]
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
    figures = overlay_figures(outputs, folder)
    lines += [f"![{name}]({name})" for name in figures]
    atomic_write_text(folder / "report.md", "\n".join(lines))
    write_json(folder / "rows.json", rows)
    return {"rows": len(rows)}


def overlay_figures(outputs: dict[str, Output], folder: Path) -> list[str]:
    """Every arm in one figure: training loss by step, Best-of-n (proxy and gold against KL_bon) and PPO
    (gold and proxy against KL)."""
    from rmens.evaluation.overlay import plot_bon_overlay, plot_ppo_overlay, plot_train_overlay

    made = []
    trained = {label: ref.file("ensemble") / "train_metrics.json" for label, ref in outputs.items()
               if ref.step == "train_ensemble"}
    histories = {label: [row for phase in json.loads(path.read_text())["history"].values() for row in phase]
                 for label, path in trained.items() if path.is_file()}
    if plot_train_overlay(histories, folder / "train_overlay.png"):
        made.append("train_overlay.png")
    bon = [ref for ref in outputs.values() if ref.step == "best_of_n"]
    if bon and plot_bon_overlay(json.loads((bon[0].file("curves")).read_text()),
                                folder / "bon_overlay.png"):
        made.append("bon_overlay.png")
    ppo = {label.removeprefix("eval:ppo:"): json.loads(ref.file("ppo_points").read_text())
           for label, ref in outputs.items() if ref.step == "evaluate" and ref.file("ppo_points").is_file()}
    if plot_ppo_overlay(ppo, folder / "ppo_overlay.png"):
        made.append("ppo_overlay.png")
    return made


def _numbers(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k not in ("label", "stage", "artifact") and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def _subject(row: dict) -> str:
    """What a row is about, without its stage: an arm (linear-k3), an arm and rule, a PPO run or a pick."""
    return row["label"].removeprefix("eval:" if row["stage"] == "evaluate" else "ppo:")


def headline_metrics(rows: list[dict]) -> dict[str, float]:
    """The numbers the report shows, as `<stage>.<metric>/<subject>` metrics of the flow's parent run (e.g.
    evaluate.win_rate/bon:linear-k3/mean:n4), so that flow runs of different presets, configs and days
    compare in MLflow's runs table and charts; the arm is never inside a stage's own metric names."""
    return {f"{row['stage']}.{metric}/{_subject(row)}": value for row in rows
            for metric, value in _numbers(row).items() if metric in REPORT_COLUMNS.get(row["stage"], ())}


def long_table(rows: list[dict]) -> dict[str, list]:
    """Every number as one row of (stage, label, metric, value): no empty cells, however different the
    stages' metrics (MLflow's table view sorts and filters it)."""
    long = [(row["stage"], row["label"], metric, value) for row in rows for metric, value in _numbers(row).items()]
    return {name: [item[i] for item in long] for i, name in enumerate(("stage", "label", "metric", "value"))}


def stage_tables(rows: list[dict]) -> dict[str, list[dict[str, str]]]:
    """One table per stage (label, then the numbers that stage's outputs have), formatted."""
    tables = {}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        stage_rows = [r for r in rows if r["stage"] == stage]
        present = {k for r in stage_rows for k in _numbers(r)}
        columns = [k for k in REPORT_COLUMNS.get(stage, sorted(present)) if k in present]
        tables[stage] = [{"label": r["label"], **{k: _fmt(r.get(k, "")) for k in columns}} for r in stage_rows]
    return tables
