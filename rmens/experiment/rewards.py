"""Experiment step that judges the reward models from their stored scores (no forward pass): agreement
with the judge's held-out verdicts, and logged-output Best-of-n curves of every arm and rule."""

from __future__ import annotations

from pathlib import Path

import torch

from rmens.config import AggregationConfig
from rmens.evaluation import logged_bon as lb
from rmens.evaluation import pools as pl
from rmens.evaluation.rm_metrics import ensemble_metrics, length_metrics
from rmens.experiment.config import ArmSpec, PoolConfig
from rmens.experiment.data import read_split_pools
from rmens.experiment.plan import SCORES
from rmens.io import write_json
from rmens.models.aggregate import aggregate_with

JUDGE_NAMES = {"ae1": "GPT-4 (AlpacaEval 1, against text_davinci_003)",
               "ae2": "GPT-4-turbo (AlpacaEval 2, against gpt4_1106_preview)"}


def reward_metrics(pools: list[pl.Pool], table: pl.ScoreTable) -> dict:
    """Agreement with the judge's held-out verdicts: accuracy, ECE, member accuracies, and accuracy where the
    longer output lost next to "the longer wins"."""
    margins, len_winner, len_loser = lb.verdict_margins(pools, table)
    metrics = ensemble_metrics(margins.float())
    keep = ("accuracy", "member_accuracy", "member_accuracy_mean", "ece", "margin_std", "n_pairs")
    return {**{k: metrics[k] for k in keep}, **length_metrics(margins.mean(dim=0), len_winner, len_loser)}


def rewards_step(folder: Path, *, pools: Path, scores: dict[str, Path], arms: list[ArmSpec],
                 rules: list[AggregationConfig], config: PoolConfig) -> dict:
    """Held-out agreement and logged-output Best-of-n curves of every arm x rule, the gold judge and the
    baselines, from stored scores (no forward pass). Writes rm_eval.json, logged_bon.{json,csv},
    logged_bon_<judge>.png and per_instruction.json (for paired comparisons)."""
    ns = lb.bon_ns(config.max_n)
    results: dict = {"judges": {}}
    rm_eval: dict = {}
    per_instruction: dict = {}
    summary: dict = {}
    tables = {label: pl.ScoreTable.load(Path(path) / SCORES) for label, path in scores.items()}
    for judge in config.judges:
        judge_pools = read_split_pools(pools, judge)
        series: dict[str, dict[str, list[torch.Tensor]]] = {"baselines": lb.baseline_rewards(judge_pools)}
        series["gold"] = {"gold/mean": [m.mean(dim=0) for m in lb.member_rewards(judge_pools, tables["gold"])]}
        series["arms"] = {}
        for arm in arms:
            members = lb.member_rewards(judge_pools, tables[arm.label])
            for rule in arm.rules(rules):
                series["arms"][f"{arm.label}/{rule.name}"] = [aggregate_with(m, rule) for m in members]
        entry = {"judge_name": JUDGE_NAMES[judge], "n_instructions": len(judge_pools),
                 "pool_sizes": sorted({len(p) for p in judge_pools}), "ns": ns,
                 "rules": {arm.label: [rule.name for rule in arm.rules(rules)] for arm in arms}}
        values: dict[str, dict[str, list[float]]] = {}
        for group, named in series.items():
            entry[group] = {}
            for name, rewards in named.items():
                rows = lb.curve(judge_pools, rewards, ns, with_values=True)
                values[name] = {str(row["n"]): row.pop("values") for row in rows}
                entry[group][name] = rows
        results["judges"][judge] = entry
        per_instruction[judge] = values
        rm_eval[judge] = {label: reward_metrics(judge_pools, table) for label, table in tables.items()}
        for name, rows in {**entry["arms"], **entry["gold"]}.items():
            summary[f"{judge}/{name}/win_rate_at_max_n"] = rows[-1]["win_rate"]
        for label, metrics in rm_eval[judge].items():
            summary[f"{judge}/{label}/accuracy"] = metrics["accuracy"]
            summary[f"{judge}/{label}/accuracy_longer_lost"] = metrics["accuracy_longer_lost"]
    lb.save_logged_bon(results, folder)
    write_json(folder / "rm_eval.json", rm_eval)
    write_json(folder / "per_instruction.json", per_instruction)
    return summary


