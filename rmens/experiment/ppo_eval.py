"""Experiment step that judges PPO: every checkpoint's answers to held-out instructions, scored by its proxy
and by the gold reward model against KL, and their win rate against the reference outputs under the gold
judge."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rmens.data.sources import model_paths
from rmens.evaluation import logged_bon as lb
from rmens.evaluation import pools as pl
from rmens.experiment.data import read_prompts, read_split_pools
from rmens.io import write_json, write_jsonl
from rmens.steps import Output, step

if TYPE_CHECKING:  # types only: settings enter the step's key as values
    from rmens.generation_config import GenerationConfig
    from rmens.models.config import AggregationConfig


def _reference_of(pool: pl.Pool) -> str:
    """The reference output most verdicts of the pool were given against."""
    return max(set(pool.references), key=pool.references.count)


def sigmoid_wins(answer_scores: list[float], reference_scores: list[float]) -> torch.Tensor:
    """P(answer beats its reference) under a Bradley-Terry judge: sigmoid(r_answer - r_reference). Written
    out (as are its mean and standard error) because alpaca_eval, whose metrics the orchestration layer
    uses, is not installed on GPU machines."""
    return torch.sigmoid(torch.tensor(answer_scores, dtype=torch.float64)
                         - torch.tensor(reference_scores, dtype=torch.float64))


@step("ppo_eval", devices=1, memory_gib=4, reads=lambda policy, **_: model_paths(policy))
def ppo_eval_step(folder: Path, *, run: Output, reward: Output, rule: AggregationConfig, gold: Output,
                  gold_scores: Output, pools: Output, judges: list[str], policy: str,
                  generation: GenerationConfig) -> dict:
    """Gold and proxy scores of every PPO checkpoint's answers to held-out instructions against KL, and
    the gold judge's win rate of those answers against each judge set's reference outputs."""
    from rmens.evaluation.ppo_eval import evaluate_run
    from rmens.generation import prompts_that_fit
    from rmens.reward import EnsembleReward

    # The same prompts for every PPO arm of an experiment (one policy): paired comparisons stay paired.
    prompts, too_long = prompts_that_fit(policy, read_prompts(pools.file("eval_prompts")), generation.max_new_tokens)
    # The gold judge's win probability is the sigmoid of a difference of its raw Bradley-Terry rewards (the
    # references' are read raw from its score table): standardising would rescale the logit.
    scorers = {"proxy": EnsembleReward.from_folder(reward.file("ensemble"), rule),
               "gold": functools.partial(EnsembleReward.from_folder(gold.file("ensemble")), standardise=False)}
    points = evaluate_run(run.file("run"), prompts, scorers, generation=generation,
                          reward_folder=reward.file("ensemble"), keep_samples=True)
    table = pl.ScoreTable.load(gold_scores.file("scores"))
    references = {judge: {p.instruction: _reference_of(p) for p in read_split_pools(pools, judge)}
                  for judge in judges}
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
    summary = {"eval_prompts": len(prompts), "eval_prompts_too_long": too_long, "final_step": last["step"],
               "final_kl": last["kl"], "gold_gain": last["gold"] - first["gold"],
               "proxy_gain": last["proxy"] - first["proxy"], "final_response_chars": last["response_chars"],
               "initial_response_chars": first["response_chars"]}
    for judge in judges:
        for key in (f"gold_win_rate_{judge}", f"gold_win_rate_{judge}_se"):
            summary[f"initial_{key}"], summary[f"final_{key}"] = first[key], last[key]
    write_json(folder / "ppo_eval.json", {"points": points, "summary": summary})
    return summary


