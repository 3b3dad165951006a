"""The steps of the reference experiment, each `step(folder, **inputs) -> summary`.

A step writes everything it produces into its own `folder` and reads its inputs from the folders of
earlier steps, so the same functions run under the plain runner (rmens.experiment.runner) and as
Prefect tasks with MLflow tracking (tasks/experiment.py). Summaries are flat and JSON-serialisable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rmens.config import AggregationConfig, EnsembleConfig, GenerationConfig, PPOConfig, TrainConfig
from rmens.data.loaders import load_jsonl_pairs
from rmens.data.splits import flip_labels
from rmens.evaluation import logged_bon as lb
from rmens.evaluation.rm_metrics import ensemble_metrics, length_metrics
from rmens.experiment.config import ArmSpec, PoolConfig, SplitConfig
from rmens.experiment.data import PROXY_PAIRS, prepare_data, read_prompts, read_split_pools
from rmens.experiment.measure import measure
from rmens.experiment.report import report_step
from rmens.io import atomic_write_text, write_jsonl
from rmens.models.aggregate import aggregate_with

log = logging.getLogger(__name__)

JUDGE_NAMES = {"ae1": "GPT-4 (AlpacaEval 1, against text_davinci_003)",
               "ae2": "GPT-4-turbo (AlpacaEval 2, against gpt4_1106_preview)"}


def _write_json(path: Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2))


def read_json(folder: str | Path, name: str):
    return json.loads((Path(folder) / name).read_text())


def data_step(folder: Path, *, split: SplitConfig) -> dict:
    """Evaluation pools, training pairs and prompt sets (rmens.experiment.data)."""
    return prepare_data(split, folder)


def train_step(folder: Path, *, pairs: Path, pairs_file: str, ensemble: EnsembleConfig, train: TrainConfig) -> dict:
    """One reward model or ensemble on the pairs of an earlier step; wall time and peak memory measured."""
    from rmens.training.trainer import train_ensemble

    training = load_jsonl_pairs(Path(pairs) / pairs_file)
    with measure() as cost:
        result = train_ensemble(ensemble, train, training, None, folder / "ensemble")
    trainable = sum(p.numel() for p in result.ensemble.parameters() if p.requires_grad)
    summary = {"pairs": len(training), "steps": sum(s.steps for s in result.stages.values()),
               "train_wall_s": cost["wall_s"], "train_peak_mib": cost["peak_mib"], "memory": cost["memory"],
               "train_peak_over_start_mib": cost["peak_mib"] - cost.get("rss_before_mib", 0.0),
               "param_mib": result.ensemble.parameter_bytes() / 2**20, "trainable_params": trainable,
               "device": str(next(result.ensemble.parameters()).device)}
    _write_json(folder / "train_summary.json", summary)
    return summary


def proxy_labels_step(folder: Path, *, pairs: Path, gold: Path | None, label_noise: float, seed: int) -> dict:
    """The proxies' pairs relabelled by the gold judge (the higher gold reward wins) and/or with a share of
    labels flipped (Coste et al.)."""
    from rmens.reward import EnsembleReward

    training = load_jsonl_pairs(Path(pairs) / PROXY_PAIRS)
    relabelled = 0
    if gold is not None:
        judge = EnsembleReward.from_folder(Path(gold) / "ensemble")
        prompts = [p.prompt for p in training]
        margin = (judge(prompts, [p.chosen for p in training]).scores
                  - judge(prompts, [p.rejected for p in training]).scores)
        relabelled = int((margin < 0).sum())
        training = [p if m >= 0 else dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen,
                                                         source={**p.source, "relabelled_by_gold": True})
                    for p, m in zip(training, margin.tolist())]
        training = [dataclasses.replace(p, weight=1.0) for p in training]  # the gold model's labels are firm
    training = flip_labels(training, label_noise, seed) if label_noise else training
    write_jsonl(folder / PROXY_PAIRS, (p.to_dict() for p in training))
    return {"pairs": len(training), "relabelled_by_gold": relabelled,
            "flipped": sum(bool(p.source.get("label_flipped")) for p in training)}


def score_step(folder: Path, *, model: Path, data: Path, judges: list[str], batch_size: int) -> dict:
    """Every pool response and reference scored once by every member (scores.npz), resumable."""
    from rmens.reward import EnsembleReward

    items = lb.pool_items([pool for judge in judges for pool in read_split_pools(data, judge)])
    reward = EnsembleReward.from_folder(Path(model) / "ensemble", batch_size=batch_size)
    bar = tqdm(total=len(items), desc=f"score {Path(model).name}", unit="resp", mininterval=5)

    def advance(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    with measure() as cost:
        table = lb.score_items(reward.member_scores, items, folder / "scores.npz", progress=advance)
    bar.close()
    summary = {"responses": len(items), "k": table.k, "score_wall_s": cost["wall_s"],
               "score_peak_mib": cost["peak_mib"], "responses_per_s": len(items) / max(cost["wall_s"], 1e-9)}
    _write_json(folder / "score_summary.json", summary)
    return summary


def _table(folder: Path) -> lb.ScoreTable:
    return lb.ScoreTable.load(Path(folder) / "scores.npz")


def reward_metrics(pools: list[lb.Pool], table: lb.ScoreTable) -> dict:
    """Agreement with the judge's held-out verdicts: accuracy, ECE, member accuracies, and accuracy where the
    longer output lost next to "the longer wins"."""
    margins, len_winner, len_loser = lb.verdict_margins(pools, table)
    metrics = ensemble_metrics(margins.float())
    keep = ("accuracy", "member_accuracy", "member_accuracy_mean", "ece", "margin_std", "n_pairs")
    return {**{k: metrics[k] for k in keep}, **length_metrics(margins.mean(dim=0), len_winner, len_loser)}


def rewards_step(folder: Path, *, data: Path, scores: dict[str, Path], arms: list[ArmSpec],
                 rules: list[AggregationConfig], pools: PoolConfig) -> dict:
    """Held-out agreement and logged-output Best-of-n curves of every arm x rule, the gold judge and the
    baselines, from stored scores (no forward pass). Writes rm_eval.json, logged_bon.{json,csv},
    logged_bon_<judge>.png and per_instruction.json (for paired comparisons)."""
    ns = lb.bon_ns(pools.max_n)
    results: dict = {"judges": {}}
    rm_eval: dict = {}
    per_instruction: dict = {}
    summary: dict = {}
    tables = {label: _table(path) for label, path in scores.items()}
    for judge in pools.judges:
        judge_pools = read_split_pools(data, judge)
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
    _write_json(folder / "rm_eval.json", rm_eval)
    _write_json(folder / "per_instruction.json", per_instruction)
    return summary


def ppo_step(folder: Path, *, reward: Path, data: Path, ppo: PPOConfig) -> dict:
    """PPO of the policy against one arm's reward under one rule; resumes from its last checkpoint."""
    from rmens.ppo.trainer import PPOTrainer
    from rmens.reward import EnsembleReward

    reward_fn = EnsembleReward.from_folder(Path(reward) / "ensemble", ppo.aggregation)
    trainer = PPOTrainer(ppo, read_prompts(data)["ppo"], reward_fn, folder / "run",
                         reward_folder=Path(reward) / "ensemble")
    with measure() as cost:
        result = trainer.train(resume=True)
    last = result.history[-1]
    summary = {"steps": len(result.history), "final_reward": last["reward"], "final_kl": last["kl"],
               "final_response_length": last["response_length"], "ppo_wall_s": cost["wall_s"],
               "ppo_peak_mib": cost["peak_mib"]}
    _write_json(folder / "ppo_summary.json", summary)
    return summary


def _reference_of(pool: lb.Pool) -> str:
    """The reference output most verdicts of the pool were given against."""
    return max(set(pool.references), key=pool.references.count)


def sigmoid_wins(answer_scores: list[float], reference_scores: list[float]) -> torch.Tensor:
    """P(answer beats its reference) under a Bradley-Terry judge: sigmoid(r_answer - r_reference). Written
    out (as are its mean and standard error) because alpaca_eval, whose metrics the orchestration layer
    uses, is not installed on GPU machines."""
    return torch.sigmoid(torch.tensor(answer_scores, dtype=torch.float64) - torch.tensor(reference_scores))


def ppo_eval_step(folder: Path, *, run: Path, reward: Path, rule: AggregationConfig, gold: Path, gold_scores: Path,
                  data: Path, judges: list[str], generation: GenerationConfig) -> dict:
    """Gold and proxy scores of every PPO checkpoint's answers to held-out instructions against KL, and
    the gold judge's win rate of those answers against each judge set's reference outputs."""
    from rmens.evaluation.ppo_eval import evaluate_run
    from rmens.reward import EnsembleReward

    prompts = read_prompts(data)["eval"]
    scorers = {"proxy": EnsembleReward.from_folder(Path(reward) / "ensemble", rule),
               "gold": EnsembleReward.from_folder(Path(gold) / "ensemble")}
    points = evaluate_run(Path(run) / "run", prompts, scorers, generation=generation,
                          reward_folder=Path(reward) / "ensemble", keep_samples=True)
    table = _table(gold_scores)
    references = {judge: {p.instruction: _reference_of(p) for p in read_split_pools(data, judge)} for judge in judges}
    for point in points:
        samples = point.pop("samples")
        for judge, refs in references.items():
            rows = [i for i, prompt in enumerate(prompts) if prompt in refs]
            ref_scores = [float(table.lookup(prompts[i], [refs[prompts[i]]]).mean()) for i in rows]
            wins = sigmoid_wins([samples["gold"][i] for i in rows], ref_scores)
            point[f"gold_win_rate_{judge}"], point[f"gold_win_rate_{judge}_se"] = float(wins.mean()), \
                lb.standard_error(wins)
            point[f"gold_values_{judge}"] = wins.tolist()  # per instruction, for paired comparisons
        point["sqrt_kl"] = math.sqrt(max(point["kl"], 0.0))
    write_jsonl(folder / "points.jsonl", points)
    first, last = points[0], points[-1]
    summary = {"final_step": last["step"], "final_kl": last["kl"], "gold_gain": last["gold"] - first["gold"],
               "proxy_gain": last["proxy"] - first["proxy"], "final_response_chars": last["response_chars"],
               "initial_response_chars": first["response_chars"]}
    for judge in judges:
        for key in (f"gold_win_rate_{judge}", f"gold_win_rate_{judge}_se"):
            summary[f"initial_{key}"], summary[f"final_{key}"] = first[key], last[key]
    _write_json(folder / "ppo_eval.json", {"points": points, "summary": summary})
    return summary


# The library modules whose source decides each step's output (part of every step's cache key).
_COMMON = ("rmens.experiment.config", "rmens.experiment.steps", "rmens.config")
STEP_CODE: dict[str, tuple[str, ...]] = {
    "data": ("rmens.experiment.data", "rmens.evaluation.logged_bon", "rmens.data"),
    "train": ("rmens.training", "rmens.models", "rmens.data", "rmens.evaluation.rm_metrics"),
    "proxy_labels": ("rmens.reward", "rmens.models", "rmens.data"),
    "score": ("rmens.evaluation.logged_bon", "rmens.reward", "rmens.models", "rmens.data.encoding"),
    "rewards": ("rmens.evaluation.logged_bon", "rmens.bon", "rmens.evaluation.rm_metrics", "rmens.models.aggregate"),
    "ppo": ("rmens.ppo", "rmens.generation", "rmens.reward", "rmens.models", "rmens.data"),
    "ppo_eval": ("rmens.evaluation.ppo_eval", "rmens.ppo", "rmens.generation", "rmens.reward", "rmens.models",
                 "rmens.evaluation.logged_bon"),
    "report": ("rmens.experiment.report", "rmens.evaluation.curves"),
}
STEP_CODE = {step: modules + _COMMON for step, modules in STEP_CODE.items()}

STEPS = {"data": data_step, "train": train_step, "proxy_labels": proxy_labels_step, "score": score_step,
         "rewards": rewards_step, "ppo": ppo_step, "ppo_eval": ppo_eval_step, "report": report_step}
