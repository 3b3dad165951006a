"""The order of the pipeline's steps, written once, for every runner (rmens.steps.runner in-process,
flows/ under Prefect with MLflow).

    models, pairs -> gold judge -> every arm's ensemble (once for all its rules) -> samples (once) ->
    member scores of each arm and the judge's -> Best-of-n curves and picks of every arm x rule ->
    the initial policy's evaluation -> PPO of each PPO arm and its evaluation -> each pick's evaluation ->
    one comparison report

Each plan function calls `call(step, label, tags=..., **inputs)` and returns the outputs by label.
"""

from __future__ import annotations

from rmens.config import Arm, EvaluateFlowConfig, PipelineConfig, TrainFlowConfig, derive
from rmens.pipeline.comparison import report
from rmens.pipeline.data import prepare_data, prepare_models
from rmens.pipeline.evaluate import evaluate
from rmens.pipeline.policy import ppo
from rmens.pipeline.reward_models import train_ensemble
from rmens.pipeline.sampling import best_of_n, sample, score
from rmens.steps import Output
from rmens.steps.runner import Call

STEPS = (prepare_models, prepare_data, train_ensemble, sample, score, best_of_n, ppo, evaluate, report)
SCORED_JUDGES = ("reward_model", "hf_reward_model", "local_llm")  # judges that score samples one by one


def run_pipeline(config: PipelineConfig, call: Call) -> dict[str, Output]:
    """Every step of the pipeline; returns its outputs by label, the comparison report as 'report'."""
    call(prepare_models, "models", names=[config.ensemble.backbone, config.policy])
    data = call(prepare_data, "arms", data=config.data)
    judge = train_judge(call, config)
    arms = train_arms(call, config, data)
    outputs: dict[str, Output] = {"data": data, **({"judge": judge} if judge else {}),
                                  **{arm.label: output for arm, output in arms.items()}}

    samples = call(sample, "bon", policy=config.policy, prompts=config.bon_prompts, bon=config.bon)
    proxies = {arm.label: call(score, arm.label, tags=arm.describe(), samples=samples, scorer=output, name=arm.label)
               for arm, output in arms.items()}
    judge_scores = call(score, "judge", samples=samples, scorer=judge, name="judge", judge=config.judge) \
        if config.judge.kind in SCORED_JUDGES else None
    selections = config.selections()
    outputs["best_of_n"] = bon = call(best_of_n, "bon", samples=samples, proxies=proxies, judge=judge_scores,
                                      arms=list(arms), rules=config.arms.rules,
                                      select_n=sorted({s.n for s in selections}))

    common = {"eval_cfg": config.evaluate, "judge_cfg": config.judge, "judge": judge}
    outputs["eval:initial"] = call(evaluate, "initial", label="initial", policy=config.policy, **common)
    for run_spec in config.ppo_runs():
        label, tags, proxy = run_spec.label, run_spec.describe(), arms[run_spec.arm]
        ppo_cfg = derive(config.ppo, policy=config.policy, aggregation=run_spec.rule)
        run = call(ppo, label, tags=tags, ppo_cfg=ppo_cfg, reward=proxy, prompts=config.ppo_prompts, label=label,
                   judge_cfg=config.judge, judge=judge)
        outputs[f"ppo:{label}"] = run
        outputs[f"eval:ppo:{label}"] = call(evaluate, f"ppo:{label}", tags=tags, label=f"ppo:{label}", ppo_run=run,
                                            proxy=proxy, **common)
    for pick in selections:
        outputs[f"eval:{pick.label}"] = call(evaluate, pick.label, tags=pick.describe(), label=pick.label, bon=bon,
                                             bon_selection=pick, **common)
    outputs["report"] = call(report, "report", title=f"rmens pipeline '{config.name}'", outputs=dict(outputs))
    return outputs


def train_judge(call: Call, config: PipelineConfig | EvaluateFlowConfig) -> Output | None:
    """The offline gold judge: a reward model trained on many more pairs than the arms see."""
    if config.judge.kind != "reward_model":
        return None
    data = call(prepare_data, "judge", data=config.judge.data)
    return call(train_ensemble, "judge", data=data, ensemble=config.judge.ensemble, train_cfg=config.judge.train,
                label="judge")


def train_arms(call: Call, config: PipelineConfig, data: Output) -> dict[Arm, Output]:
    """Every arm's reward model, trained once for all its rules."""
    return {arm: call(train_ensemble, arm.label, tags=arm.describe(), data=data, train_cfg=config.train,
                      label=arm.label, ensemble=arm.ensemble(config.ensemble))
            for arm in config.arms.arms()}


def train_one(call: Call, config: TrainFlowConfig) -> tuple[Output, Output]:
    """(data, ensemble) of the train and retrain flows."""
    call(prepare_models, "models", names=[config.ensemble.backbone])
    data = call(prepare_data, config.label, data=config.data)
    model = call(train_ensemble, config.label, data=data, ensemble=config.ensemble, train_cfg=config.train,
                 label=config.label)
    return data, model


def evaluate_policy(call: Call, config: EvaluateFlowConfig) -> Output:
    """One policy's evaluation by the judge (the evaluate flow)."""
    call(prepare_models, "models", names=[config.policy])
    judge = train_judge(call, config)
    return call(evaluate, config.label, label=config.label, policy=config.policy, eval_cfg=config.evaluate,
                judge_cfg=config.judge, judge=judge)
