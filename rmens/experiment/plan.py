"""The reference experiment as one sequence of steps, whatever runs them.

`run_plan(cfg, call)` calls `call(step, label, **inputs)` for every step in order and hands what `call`
returns (a handle on the step's output) to the steps that read it. rmens.experiment.runner executes the
steps in-process with resumable folders (the plain script, and GPU machines without Prefect or MLflow);
tasks/experiment.py executes them as cached Prefect tasks with one MLflow child run each. The order of
the steps and the inputs of each are written once, here.

    data -> gold -> [proxy labels] -> arms -> scores (gold and every arm) -> rewards (agreement and
    logged-output Best-of-n) -> PPO of each PPO arm -> its evaluation under the gold judge -> report
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from rmens.experiment.config import ExperimentConfig

Part = Literal["rewards", "all"]
GOLD_PAIRS, PROXY_PAIRS = "gold_pairs.jsonl", "proxy_pairs.jsonl"  # in the data step's folder

# The library modules whose source decides each step's output: part of every step's cache key. (The
# settings themselves enter the key as values.)
STEP_CODE: dict[str, tuple[str, ...]] = {
    "data": ("rmens.experiment.data", "rmens.evaluation.logged_bon", "rmens.data"),
    "train": ("rmens.experiment.train", "rmens.training", "rmens.models", "rmens.data", "rmens.evaluation.rm_metrics"),
    "proxy_labels": ("rmens.experiment.train", "rmens.reward", "rmens.models", "rmens.data"),
    "score": ("rmens.experiment.scoring", "rmens.evaluation.logged_bon", "rmens.reward", "rmens.models",
              "rmens.data.encoding"),
    "rewards": ("rmens.experiment.scoring", "rmens.evaluation.logged_bon", "rmens.bon", "rmens.evaluation.rm_metrics",
                "rmens.models.aggregate"),
    "ppo": ("rmens.experiment.ppo", "rmens.ppo", "rmens.generation", "rmens.reward", "rmens.models", "rmens.data"),
    "ppo_eval": ("rmens.experiment.ppo", "rmens.evaluation.ppo_eval", "rmens.ppo", "rmens.generation",
                 "rmens.reward", "rmens.models", "rmens.evaluation.logged_bon"),
    "report": ("rmens.experiment.report", "rmens.evaluation.curves"),
}


class StepCall(Protocol):
    def __call__(self, step: str, label: str, /, **inputs: Any) -> Any: ...


def run_plan(cfg: ExperimentConfig, call: StepCall, part: Part = "all") -> Any:
    """Run the steps; `part='rewards'` stops before PPO (a GPU check runs the parts in separate calls).
    Returns the report step's handle."""
    data = call("data", "data", split=cfg.split)
    gold = call("train", "gold", pairs=data, pairs_file=GOLD_PAIRS, ensemble=cfg.gold.ensemble, train=cfg.gold.train)
    proxy_pairs = data
    if cfg.proxy_labels.active:
        proxy_pairs = call("proxy_labels", "proxy", pairs=data, gold=gold if cfg.proxy_labels.relabel_by_gold else None,
                           label_noise=cfg.proxy_labels.label_noise, seed=cfg.split.seed)
    arms = {arm.label: call("train", arm.label, pairs=proxy_pairs, pairs_file=PROXY_PAIRS,
                            ensemble=arm.ensemble_config(cfg.ensemble), train=cfg.train) for arm in cfg.arms}
    judges = list(cfg.split.pools.judges)
    scores = {label: call("score", label, model=model, data=data, judges=judges, batch_size=cfg.score_batch_size)
              for label, model in {"gold": gold, **arms}.items()}
    rewards = call("rewards", "rewards", data=data, scores=scores, arms=cfg.arms, rules=cfg.rules,
                   pools=cfg.split.pools)
    ppo_runs, ppo_evals = {}, {}
    if part == "all" and cfg.ppo is not None:
        for ppo_arm in cfg.ppo_arms:
            run = ppo_runs[ppo_arm.label] = call("ppo", ppo_arm.label, reward=arms[ppo_arm.arm], data=data,
                                                 ppo=cfg.ppo_config(ppo_arm))
            ppo_evals[ppo_arm.label] = call("ppo_eval", ppo_arm.label, run=run, reward=arms[ppo_arm.arm],
                                            rule=ppo_arm.rule, gold=gold, gold_scores=scores["gold"], data=data,
                                            judges=judges, generation=cfg.ppo_generation)
    return call("report", "report", experiment=cfg, data=data, trains={"gold": gold, **arms}, scores=scores,
                rewards=rewards, ppo_runs=ppo_runs, ppo_evals=ppo_evals, part=part)
