"""Experiment step that judges the reward models from their stored scores (no forward pass): agreement with
the judges' held-out verdicts and logged-output Best-of-n curves of every arm and rule, each over all the
arm's training runs and beside its untrained twins, on the AlpacaEval pools and on MT-Bench's graded pools.

Every rule aggregates standardised members (rmens.models.standardise); agreement and calibration read each
model's own Bradley-Terry scale (raw members: a probability is the sigmoid of a raw margin).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from rmens.arms import Arm
from rmens.evaluation import logged_bon as lb
from rmens.evaluation import pools as pl
from rmens.evaluation.rm_metrics import ensemble_metrics, length_metrics, pairwise_accuracy
from rmens.evaluation.stats import compare
from rmens.experiment.config import MtBenchConfig, PoolConfig
from rmens.experiment.data import MT_BENCH, pools_file, read_split_pools
from rmens.experiment.twins import twin_file
from rmens.io import write_json
from rmens.models.aggregate import aggregate_with
from rmens.steps import Output, step

if TYPE_CHECKING:  # types only: settings enter the step's key as values
    from rmens.models.config import AggregationConfig

JUDGE_NAMES = {"ae1": "GPT-4 (AlpacaEval 1, against text_davinci_003)",
               "ae2": "GPT-4-turbo (AlpacaEval 2, against gpt4_1106_preview)",
               MT_BENCH: "GPT-4 single-answer grades (MT-Bench)"}
GOLD = "gold"


@dataclass
class EvaluationSet:
    """One set of logged pools with its judge's verdicts: an AlpacaEval judge set or MT-Bench. `rewards`
    reads every pool's member scores [k, m] from a score table; `curve` gives Best-of-n rows (with
    per-pool values) under a reward vector per pool; `agreement` gives the agreement metrics of member
    scores, with per-pool accuracy (nan where a pool holds no decided pair)."""

    name: str
    metric: str  # what a row's value is: "win_rate" or "mean_grade"
    n_pools: int
    pool_sizes: list[int]
    ns: list[int]
    rewards: Callable[[pl.ScoreTable, bool], list[torch.Tensor]]
    curve: Callable[[list[torch.Tensor], list[int]], list[dict]]
    agreement: Callable[[pl.ScoreTable], dict]
    baselines: dict[str, list[torch.Tensor]]


def alpaca_eval_set(pools: Path, judge: str, config: PoolConfig) -> EvaluationSet:
    judge_pools = read_split_pools(pools, judge)
    prior = json.loads((Path(pools) / f"system_prior_{judge}.json").read_text())
    return EvaluationSet(
        judge, "win_rate", len(judge_pools), sorted({len(p) for p in judge_pools}), lb.bon_ns(config.max_n),
        rewards=lambda table, std: lb.member_rewards(judge_pools, table, std),
        curve=lambda rewards, ns: lb.curve(judge_pools, rewards, ns, with_values=True),
        agreement=lambda table: ae_agreement(judge_pools, table),
        baselines=lb.baseline_rewards(judge_pools, prior))


def mt_bench_set(pools: Path, mt_bench: MtBenchConfig) -> EvaluationSet:
    from rmens.evaluation import mt_bench_grades as mg

    graded = mg.read_graded_pools(Path(pools) / pools_file(MT_BENCH))
    prior = json.loads((Path(pools) / "system_prior_mt_bench.json").read_text())
    ns = mg.capped_ns(graded, lb.bon_ns(mt_bench.max_n))

    def agreement(table: pl.ScoreTable) -> dict:  # the standardised members' order, as ae_agreement
        metrics = mg.agreement(graded, mg.pool_rewards(graded, table, standardised=True))
        per_pool = np.full(len(graded), np.nan)
        per_pool[metrics.pop("pool_indices")] = metrics.pop("per_pool")
        return {**metrics, "per_pool": per_pool.tolist()}

    return EvaluationSet(
        MT_BENCH, "mean_grade", len(graded), sorted({len(p) for p in graded}), ns,
        rewards=lambda table, std: mg.pool_rewards(graded, table, std),
        curve=lambda rewards, ns: mg.bon_rows(graded, rewards, ns, with_values=True),
        agreement=agreement, baselines=mg.baseline_rewards(graded, prior))


def ae_agreement(pools: list[pl.Pool], table: pl.ScoreTable) -> dict:
    """Agreement with the judge's held-out verdicts (output against reference): accuracy of the ensemble's
    mean over standardised members (the members the rules read; accuracy needs only their order), member
    accuracies, accuracy where the longer output lost next to "the longer wins", per pool; and ECE on the raw
    Bradley-Terry scale (a probability is the sigmoid of a raw margin)."""
    raw_margins, len_winner, len_loser, pool_of = lb.verdict_margins(pools, table)
    # a standardised margin is the raw one over the member's scale (the centre cancels in a difference)
    margins = raw_margins / torch.from_numpy(table.scale)[:, None]
    metrics = ensemble_metrics(margins.float())
    raw = ensemble_metrics(raw_margins.float())
    ensemble = margins.mean(dim=0)
    per_pool = [pairwise_accuracy(ensemble[pool_of == i]) if bool((pool_of == i).any()) else math.nan
                for i in range(len(pools))]
    return {**{k: metrics[k] for k in ("accuracy", "member_accuracy", "member_accuracy_mean", "n_pairs")},
            "ece": raw["ece"], "margin_std": raw["margin_std"],
            **length_metrics(ensemble, len_winner, len_loser), "per_pool": per_pool}


# -- series over runs -------------------------------------------------------------------------------

def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def over_runs(run_rows: list[list[dict]], metric: str, fixed: bool) -> tuple[list[dict], dict[str, list]]:
    """Rows of one series averaged over its runs, and its per-run, per-pool values by n.

    `se` treats training runs as random (rmens.evaluation.stats; None with a single trained run); `fixed`
    series (baselines, the gold judge) have no runs, and their se is over pools."""
    rows, values = [], {}
    for by_n in zip(*run_rows, strict=True):
        matrix = np.array([row["values"] for row in by_n], dtype=np.float64)  # [runs, pools]
        spread = compare(matrix, np.zeros((1, matrix.shape[1])), a_fixed=fixed, b_fixed=True)
        rows.append({"n": by_n[0]["n"], "kl_bon": float(np.mean([r["kl_bon"] for r in by_n])),
                     metric: float(matrix.mean()), "se": _finite(spread.se),
                     "mean_length": float(np.mean([r["mean_length"] for r in by_n])), "runs": len(by_n)})
        values[str(by_n[0]["n"])] = matrix.tolist()
    return rows, values


def evaluate_set(es: EvaluationSet, tables: dict[str, pl.ScoreTable], twins: dict[str, pl.ScoreTable],
                 arms: list[Arm], runs: dict[str, int], rules: list[AggregationConfig]) -> tuple[dict, dict, dict]:
    """(logged_bon entry, per-pool values of every series, agreement) of one evaluation set."""
    entry = {"judge_name": JUDGE_NAMES[es.name], "metric": es.metric, "n_pools": es.n_pools,
             "pool_sizes": es.pool_sizes, "ns": es.ns,
             "rules": {a.label: [r.name for r in a.rules(rules)] for a in arms},
             "runs": runs}
    values: dict[str, dict] = {}
    groups = {"baselines": {name: [rewards] for name, rewards in es.baselines.items()},
              "gold": {"gold/mean": [[m.mean(dim=0) for m in es.rewards(tables[GOLD], True)]]},
              "arms": {}, "twins": {}}
    for arm in arms:
        labels = [arm.run_label(r) for r in range(runs[arm.label])]
        for group, source in (("arms", tables), ("twins", twins)):
            members = [es.rewards(source[label], True) for label in labels]
            for rule in arm.rules(rules):
                groups[group][f"{arm.label}/{rule.name}"] = [[aggregate_with(m, rule) for m in run] for run in members]
    for group, series in groups.items():
        entry[group] = {}
        for name, per_run in series.items():
            rows, by_n = over_runs([es.curve(rewards, es.ns) for rewards in per_run], es.metric,
                                   fixed=group in ("baselines", "gold"))
            entry[group][name] = rows
            values[f"{group}:{name}"] = by_n
    agreement = {label: es.agreement(table) for label, table in tables.items()}
    agreement.update({f"twin:{label}": es.agreement(table) for label, table in twins.items()})
    return entry, values, agreement


@step("rewards", memory_gib=4)
def rewards_step(folder: Path, *, pools: Output, scores: dict[str, Output], twins: Output, arms: list[Arm],
                 runs: dict[str, int], rules: list[AggregationConfig], config: PoolConfig,
                 mt_bench: MtBenchConfig) -> dict:
    """Held-out agreement and logged-output Best-of-n curves of every arm x rule (over its runs), its
    untrained twins, the gold judge and the baselines, from stored scores (no forward pass). Writes
    logged_bon.{json,csv}, logged_bon_<set>.png, the pools they were computed on (pools_<set>.jsonl),
    rm_eval.json and per_instruction.json (per-run, per-pool values, for the report's comparisons)."""
    tables = {label: pl.ScoreTable.load(output.file("scores")) for label, output in scores.items()}
    twin_tables = {label: pl.ScoreTable.load(Path(twins) / twin_file(label)) for label in tables if label != GOLD}
    sets = [alpaca_eval_set(pools, judge, config) for judge in config.judges]
    if (Path(pools) / pools_file(MT_BENCH)).is_file():
        sets.append(mt_bench_set(pools, mt_bench))
    held_out = json.loads((Path(pools) / "held_out_generators.json").read_text())
    results: dict = {"held_out_generators": held_out, "judges": {}}
    per_instruction, rm_eval, summary = {}, {}, {}
    for es in sets:
        entry, per_instruction[es.name], rm_eval[es.name] = evaluate_set(es, tables, twin_tables, arms, runs, rules)
        if es.name == MT_BENCH:
            results[MT_BENCH] = entry
        else:
            results["judges"][es.name] = entry
        shutil.copy2(Path(pools) / pools_file(es.name), folder / pools_file(es.name))
        for name, rows in {**entry["arms"], **entry["gold"]}.items():
            summary[f"{es.name}/{name}/{es.metric}_at_max_n"] = rows[-1][es.metric]
    lb.save_logged_bon(results, folder)
    write_json(folder / "rm_eval.json", rm_eval)
    write_json(folder / "per_instruction.json", per_instruction)
    return summary
