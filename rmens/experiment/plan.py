"""The reference experiment as one sequence of steps, whatever runs them.

`run_plan(cfg, call)` calls `call(step, label, **inputs)` for every step in order and hands what `call`
returns (the step's Output) to the steps that read it. rmens.experiment.runner runs it in-process over
the library's store (the plain script, and GPU machines without Prefect or MLflow); flows/experiment.py
runs it as Prefect tasks with one MLflow child run each (tasks/steps.py), with the same keys. The order
of the steps and the inputs of each are written once, here; each step is declared beside its function.

    pairs, pools -> gold -> [proxy labels] -> every run of every arm (a full ensemble: its members, then
    their assembly) -> untrained twins of every run -> scores (gold and every run) -> rewards (agreement
    and logged-output Best-of-n, AlpacaEval and MT-Bench) -> PPO runs of each PPO arm -> their evaluation
    under the gold judge -> report
"""

from __future__ import annotations

from typing import Any, Literal

from rmens.experiment.config import ExperimentConfig
from rmens.experiment.data import pairs_step, pools_step
from rmens.experiment.ppo import ppo_step
from rmens.experiment.ppo_eval import ppo_eval_step
from rmens.experiment.report import report_step
from rmens.experiment.rewards import rewards_step
from rmens.experiment.scoring import score_step
from rmens.experiment.train import member_step, proxy_labels_step, train_step
from rmens.experiment.twins import twins_step
from rmens.models.config import EnsembleConfig
from rmens.steps import Output
from rmens.steps.runner import Call
from rmens.training.config import TrainConfig

Part = Literal["rewards", "all"]
STEPS = (pairs_step, pools_step, member_step, train_step, proxy_labels_step, twins_step, score_step, rewards_step,
         ppo_step, ppo_eval_step, report_step)


def run_plan(cfg: ExperimentConfig, call: Call, part: Part = "all", sources: dict | None = None) -> Any:
    """Run the steps; `part='rewards'` stops before PPO (a GPU check runs the parts in separate calls).
    `sources` are the content hashes of the input files (rmens.experiment.data.source_fingerprints), part
    of the keys of the two data steps. Returns the report step's handle."""
    from rmens.models.context import check_max_lengths

    check_max_lengths(cfg.trained_ensembles())  # a context too long fails here, not after the data steps
    sources = sources or {"training": {}, "evaluation": {}, "mt_bench": {}}
    # the training side reads the AlpacaEval files only: another MT-Bench grades file must not retrain anything
    pairs = call(pairs_step, "pairs", source=cfg.data, split=cfg.split,
                 sources={side: files for side, files in sources.items() if side != "mt_bench"})
    pools = call(pools_step, "pools", source=cfg.data, pools=cfg.pools, mt_bench=cfg.mt_bench, sources=sources)
    gold = train_reward_model(call, "gold", pairs=pairs, pairs_file="gold_pairs", ensemble=cfg.gold.ensemble,
                              train=cfg.gold.train)
    proxy_pairs = pairs
    if cfg.proxy_labels.active:
        relabel_by = gold if cfg.proxy_labels.relabel_by_gold else None
        proxy_pairs = call(proxy_labels_step, "proxy", pairs=pairs, gold=relabel_by,
                           label_noise=cfg.proxy_labels.label_noise, seed=cfg.data.seed)
    runs = {arm.run_label(r): (arm.describe(r), arm.ensemble_config(cfg.ensemble, r), arm.train_config(cfg.train, r))
            for arm, r in cfg.trained_runs()}
    trained = {label: train_reward_model(call, label, tags=tags, pairs=proxy_pairs, pairs_file="proxy_pairs",
                                         ensemble=ensemble, train=train)
               for label, (tags, ensemble, train) in runs.items()}
    judges = list(cfg.pools.judges)
    twins = call(twins_step, "twins", pairs=proxy_pairs, pairs_file="proxy_pairs", pools=pools, judges=judges,
                 ensembles={label: ensemble for label, (_, ensemble, _) in runs.items()},
                 calibration={label: (train.seed, train.calibration_pairs) for label, (_, _, train) in runs.items()},
                 batch_size=cfg.score_batch_size)
    scores = {label: call(score_step, label, model=model, pools=pools, judges=judges, batch_size=cfg.score_batch_size)
              for label, model in {"gold": gold, **trained}.items()}
    rewards = call(rewards_step, "rewards", pools=pools, scores=scores, twins=twins, arms=cfg.arms,
                   runs={arm.label: cfg.runs_of(arm) for arm in cfg.arms}, rules=cfg.rules, config=cfg.pools,
                   mt_bench=cfg.mt_bench)
    ppo_runs, ppo_evals = {}, {}
    if part == "all" and cfg.ppo is not None:
        for ppo_arm in cfg.ppo_arms:
            arm = cfg.arm(ppo_arm.arm)
            for r in range(cfg.ppo_runs):
                reward, label, tags = trained[arm.run_label(r)], ppo_arm.run_label(r), arm.describe(r, ppo_arm.rule)
                run = ppo_runs[label] = call(ppo_step, label, tags=tags, reward=reward, pairs=pairs,
                                             ppo=cfg.ppo_config(ppo_arm, r))
                ppo_evals[label] = call(ppo_eval_step, label, tags=tags, run=run, reward=reward, rule=ppo_arm.rule,
                                        gold=gold, gold_scores=scores["gold"], pools=pools, judges=judges,
                                        policy=cfg.policy, generation=cfg.ppo_generation)
    return call(report_step, "report", experiment=cfg, pairs=pairs, pools=pools, trains={"gold": gold, **trained},
                scores=scores, twins=twins, rewards=rewards, ppo_runs=ppo_runs, ppo_evals=ppo_evals, part=part)


def train_reward_model(call: Call, label: str, *, tags: dict[str, str] | None = None, pairs: Output, pairs_file: str,
                       ensemble: EnsembleConfig, train: TrainConfig) -> Output:
    """One reward model or ensemble, in one call; a full ensemble as k member calls (`<label>/m<i>`, which read
    nothing of each other, so a graph runner starts them at once) and the call that assembles them."""
    inputs = {"pairs": pairs, "pairs_file": pairs_file, "ensemble": ensemble, "train": train}
    if ensemble.kind == "full":
        inputs["members"] = [call(member_step, f"{label}/m{i}", tags={**(tags or {}), "member": str(i)}, member=i,
                                  pairs=pairs, pairs_file=pairs_file, ensemble=ensemble, train=train)
                             for i in range(ensemble.k)]
    return call(train_step, label, tags=tags, **inputs)
