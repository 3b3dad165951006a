"""The order of the pipeline's steps, written once, for every runner (rmens.steps.runner in-process,
flows/ under Prefect with MLflow).

    models, pairs -> gold -> every run of every arm (once for all its rules; a full ensemble as k member
    steps and their assembly) -> samples (once) -> member scores of each run and the gold's ->
    Best-of-n curves and picks of every run x rule ->
    the initial policy's evaluation -> PPO runs of each PPO arm and their evaluation -> each pick's
    evaluation -> one comparison report

Each plan function calls `call(step, label, tags=..., **inputs)` and returns the outputs by label.
"""

from __future__ import annotations

from rmens.models.config import EnsembleConfig
from rmens.pipeline.comparison import report
from rmens.pipeline.config import EvaluateFlowConfig, PipelineConfig, TrainFlowConfig
from rmens.pipeline.data import prepare_data, prepare_models
from rmens.pipeline.evaluate import evaluate
from rmens.pipeline.policy import ppo
from rmens.pipeline.reward_models import train_ensemble, train_member
from rmens.pipeline.sampling import best_of_n, sample, score
from rmens.steps import Output
from rmens.steps.runner import Call
from rmens.training.config import TrainConfig

STEPS = (prepare_models, prepare_data, train_member, train_ensemble, sample, score, best_of_n, ppo, evaluate, report)
SCORING_GOLDS = ("reward_model", "hf_reward_model", "local_llm")  # golds that score samples one by one


def run_pipeline(config: PipelineConfig, call: Call) -> dict[str, Output]:
    """Every step of the pipeline; returns its outputs by label, the comparison report as 'report'."""
    call(prepare_models, "models", names=[config.ensemble.backbone, config.policy])
    data = call(prepare_data, "arms", data=config.data)
    gold = train_gold(call, config)
    trained = train_arms(call, config, data)
    outputs: dict[str, Output] = {"data": data, **({"gold": gold} if gold else {}), **trained}

    samples = call(sample, "bon", policy=config.policy, prompts=config.bon_prompts, bon=config.bon)
    proxies = {arm.run_label(run): call(score, arm.run_label(run), tags=arm.describe(run), samples=samples,
                                        scorer=trained[arm.run_label(run)], name=arm.run_label(run))
               for arm, run in config.trained_runs()}
    gold_scores = call(score, "gold", samples=samples, scorer=gold, name="gold", gold=config.gold) \
        if config.gold.kind in SCORING_GOLDS else None
    selections = config.selections()
    outputs["best_of_n"] = bon = call(best_of_n, "bon", samples=samples, proxies=proxies, gold=gold_scores,
                                      arms=config.arms, runs={arm.label: config.runs_of(arm) for arm in config.arms},
                                      rules=config.rules, select_n=sorted({s.n for s in selections}))

    common = {"eval_cfg": config.evaluate, "gold_cfg": config.gold, "gold": gold}
    outputs["eval:initial"] = call(evaluate, "initial", label="initial", policy=config.policy, **common)
    for ppo_arm in config.ppo_arms if config.ppo is not None else []:
        arm = config.arm(ppo_arm.arm)
        for r in range(config.ppo_runs):
            label, tags, proxy = ppo_arm.run_label(r), arm.describe(r, ppo_arm.rule), trained[arm.run_label(r)]
            run = outputs[f"ppo:{label}"] = call(ppo, label, tags=tags, ppo_cfg=config.ppo_config(ppo_arm, r),
                                                 reward=proxy, prompts=config.ppo_prompts, label=label,
                                                 gold_cfg=config.gold, gold=gold)
            outputs[f"eval:ppo:{label}"] = call(evaluate, f"ppo:{label}", tags=tags, label=f"ppo:{label}",
                                                ppo_run=run, proxy=proxy, **common)
    for pick in selections:
        outputs[f"eval:{pick.label}"] = call(evaluate, pick.label, tags=pick.describe(), label=pick.label, bon=bon,
                                             bon_selection=pick, **common)
    outputs["report"] = call(report, "report", title=f"rmens pipeline '{config.name}'", outputs=dict(outputs))
    return outputs


def train_gold(call: Call, config: PipelineConfig | EvaluateFlowConfig) -> Output | None:
    """The offline gold: a reward model trained on many more pairs than the arms see."""
    if config.gold.kind != "reward_model":
        return None
    data = call(prepare_data, "gold", data=config.gold.data)
    return train_reward_model(call, "gold", data=data, ensemble=config.gold.ensemble, train_cfg=config.gold.train)


def train_arms(call: Call, config: PipelineConfig, data: Output) -> dict[str, Output]:
    """Every run of every arm's reward model, trained once for all its rules, by run label."""
    return {arm.run_label(run): train_reward_model(call, arm.run_label(run), tags=arm.describe(run), data=data,
                                                   ensemble=arm.ensemble_config(config.ensemble, run),
                                                   train_cfg=arm.train_config(config.train, run))
            for arm, run in config.trained_runs()}


def train_reward_model(call: Call, label: str, *, tags: dict[str, str] | None = None, data: Output,
                       ensemble: EnsembleConfig, train_cfg: TrainConfig) -> Output:
    """One reward model or ensemble, in one call; a full ensemble as k member calls (`<label>/m<i>`, which read
    nothing of each other, so a graph runner starts them at once) and the call that assembles them."""
    inputs = {"data": data, "ensemble": ensemble, "train_cfg": train_cfg}
    if ensemble.kind == "full":
        inputs["members"] = [call(train_member, f"{label}/m{i}", tags={**(tags or {}), "member": str(i)}, member=i,
                                  data=data, ensemble=ensemble, train_cfg=train_cfg) for i in range(ensemble.k)]
    return call(train_ensemble, label, tags=tags, label=label, **inputs)


def train_one(call: Call, config: TrainFlowConfig) -> tuple[Output, Output]:
    """(data, ensemble) of the train and retrain flows."""
    call(prepare_models, "models", names=[config.ensemble.backbone])
    data = call(prepare_data, config.label, data=config.data)
    model = train_reward_model(call, config.label, data=data, ensemble=config.ensemble, train_cfg=config.train)
    return data, model


def evaluate_policy(call: Call, config: EvaluateFlowConfig) -> Output:
    """One policy's evaluation by the gold (the evaluate flow)."""
    call(prepare_models, "models", names=[config.policy])
    gold = train_gold(call, config)
    return call(evaluate, config.label, label=config.label, policy=config.policy, eval_cfg=config.evaluate,
                gold_cfg=config.gold, gold=gold)
