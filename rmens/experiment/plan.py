"""The reference experiment as one sequence of steps, whatever runs them.

`run_plan(cfg, call)` calls `call(step, label, **inputs)` for every step in order and hands what `call`
returns (a handle on the step's output) to the steps that read it. rmens.experiment.runner executes the
steps in-process with resumable folders (the plain script, and GPU machines without Prefect or MLflow);
tasks/experiment.py executes them as cached Prefect tasks with one MLflow child run each. The order of
the steps and the inputs of each are written once, here.

    pairs, pools -> gold -> [proxy labels] -> every run of every arm -> untrained twins of every run ->
    scores (gold and every run) -> rewards (agreement and logged-output Best-of-n, AlpacaEval and
    MT-Bench) -> PPO runs of each PPO arm -> their evaluation under the gold judge -> report
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from rmens.experiment.config import ExperimentConfig

Part = Literal["rewards", "all"]
GOLD_PAIRS, PROXY_PAIRS = "gold_pairs.jsonl", "proxy_pairs.jsonl"  # in the pairs step's folder
SCORES = "scores.npz"  # in a score step's folder: every member's score of every pool response
# Steps that continue an unfinished folder made from the same inputs: PPO from its last checkpoint,
# scoring from its last saved chunk. Every other unfinished folder is computed again from scratch.
RESUMABLE = frozenset({"ppo", "score", "twins"})

# The library modules whose source decides each step's output: part of every step's cache key (the settings
# themselves enter it as values). Every rmens module a step's own module imports (beyond imports for type
# annotations only) is listed, or lies inside a listed package: tests/test_experiment.py checks it.
STEP_CODE: dict[str, tuple[str, ...]] = {
    "pairs": ("rmens.experiment.data", "rmens.experiment.systems", "rmens.data", "rmens.evaluation.pools",
              "rmens.evaluation.mt_bench_grades"),
    "pools": ("rmens.experiment.data", "rmens.experiment.systems", "rmens.evaluation.pools",
              "rmens.evaluation.mt_bench_grades", "rmens.data"),
    "train": ("rmens.experiment.train", "rmens.experiment.measure", "rmens.training", "rmens.models", "rmens.reward",
              "rmens.data", "rmens.evaluation.rm_metrics"),
    "proxy_labels": ("rmens.experiment.train", "rmens.experiment.measure", "rmens.training", "rmens.reward",
                     "rmens.models", "rmens.data"),
    "score": ("rmens.experiment.scoring", "rmens.experiment.data", "rmens.experiment.measure", "rmens.evaluation.pools",
              "rmens.evaluation.mt_bench_grades", "rmens.reward", "rmens.models", "rmens.data"),
    "twins": ("rmens.experiment.twins", "rmens.experiment.scoring", "rmens.experiment.data", "rmens.experiment.measure",
              "rmens.evaluation.pools", "rmens.evaluation.mt_bench_grades", "rmens.reward", "rmens.models",
              "rmens.data", "rmens.config", "rmens.seeding"),
    "rewards": ("rmens.experiment.rewards", "rmens.experiment.data", "rmens.experiment.config",
                "rmens.experiment.twins", "rmens.evaluation.logged_bon", "rmens.evaluation.pools", "rmens.bon",
                "rmens.evaluation.mt_bench_grades", "rmens.evaluation.rm_metrics", "rmens.evaluation.stats",
                "rmens.models.aggregate"),
    "ppo": ("rmens.experiment.ppo", "rmens.experiment.data", "rmens.experiment.measure", "rmens.ppo",
            "rmens.generation", "rmens.reward", "rmens.models", "rmens.data"),
    "ppo_eval": ("rmens.experiment.ppo_eval", "rmens.experiment.data", "rmens.evaluation.ppo_eval", "rmens.ppo",
                 "rmens.generation", "rmens.reward", "rmens.models", "rmens.evaluation.pools",
                 "rmens.evaluation.logged_bon"),
    "report": ("rmens.experiment.report", "rmens.experiment.verdicts", "rmens.experiment.config",
               "rmens.experiment.data", "rmens.evaluation.curves", "rmens.evaluation.logged_bon",
               "rmens.evaluation.stats"),
}


class StepCall(Protocol):
    def __call__(self, step: str, label: str, /, **inputs: Any) -> Any: ...


def run_plan(cfg: ExperimentConfig, call: StepCall, part: Part = "all", sources: dict | None = None) -> Any:
    """Run the steps; `part='rewards'` stops before PPO (a GPU check runs the parts in separate calls).
    `sources` are the content hashes of the input files (rmens.experiment.data.source_fingerprints), part
    of the keys of the two data steps. Returns the report step's handle."""
    from rmens.models.context import check_max_lengths

    check_max_lengths(cfg.trained_ensembles())  # a context too long fails here, not after the data steps
    sources = sources or {"training": {}, "evaluation": {}, "mt_bench": {}}
    # the training side reads the AlpacaEval files only: another MT-Bench grades file must not retrain anything
    pairs = call("pairs", "pairs", source=cfg.data, split=cfg.split,
                 sources={side: files for side, files in sources.items() if side != "mt_bench"})
    pools = call("pools", "pools", source=cfg.data, pools=cfg.pools, mt_bench=cfg.mt_bench, sources=sources)
    gold = call("train", "gold", pairs=pairs, pairs_file=GOLD_PAIRS, ensemble=cfg.gold.ensemble, train=cfg.gold.train)
    proxy_pairs = pairs
    if cfg.proxy_labels.active:
        relabel_by = gold if cfg.proxy_labels.relabel_by_gold else None
        proxy_pairs = call("proxy_labels", "proxy", pairs=pairs, gold=relabel_by,
                           label_noise=cfg.proxy_labels.label_noise, seed=cfg.data.seed)
    runs = {arm.run_label(r): (arm.ensemble_config(cfg.ensemble, r), arm.train_config(cfg.train, r))
            for arm in cfg.arms for r in range(cfg.runs_of(arm))}
    trained = {label: call("train", label, pairs=proxy_pairs, pairs_file=PROXY_PAIRS, ensemble=ensemble, train=train)
               for label, (ensemble, train) in runs.items()}
    judges = list(cfg.pools.judges)
    twins = call("twins", "twins", pairs=proxy_pairs, pairs_file=PROXY_PAIRS, pools=pools, judges=judges,
                 ensembles={label: ensemble for label, (ensemble, _) in runs.items()},
                 calibration={label: (train.seed, train.calibration_pairs) for label, (_, train) in runs.items()},
                 batch_size=cfg.score_batch_size)
    scores = {label: call("score", label, model=model, pools=pools, judges=judges, batch_size=cfg.score_batch_size)
              for label, model in {"gold": gold, **trained}.items()}
    rewards = call("rewards", "rewards", pools=pools, scores=scores, twins=twins, arms=cfg.arms,
                   runs={arm.label: cfg.runs_of(arm) for arm in cfg.arms}, rules=cfg.rules, config=cfg.pools,
                   mt_bench=cfg.mt_bench)
    ppo_runs, ppo_evals = {}, {}
    if part == "all" and cfg.ppo is not None:
        for ppo_arm in cfg.ppo_arms:
            for r in range(cfg.ppo_runs):
                reward, label = trained[cfg.arm(ppo_arm.arm).run_label(r)], ppo_arm.run_label(r)
                run = ppo_runs[label] = call("ppo", label, reward=reward, pairs=pairs, ppo=cfg.ppo_config(ppo_arm, r))
                ppo_evals[label] = call("ppo_eval", label, run=run, reward=reward, rule=ppo_arm.rule, gold=gold,
                                        gold_scores=scores["gold"], pools=pools, judges=judges, policy=cfg.policy,
                                        generation=cfg.ppo_generation)
    return call("report", "report", experiment=cfg, pairs=pairs, pools=pools, trains={"gold": gold, **trained},
                scores=scores, twins=twins, rewards=rewards, ppo_runs=ppo_runs, ppo_evals=ppo_evals, part=part)
