"""The whole chain over a matrix of arms: data -> judge -> ensembles -> Best-of-n -> PPO -> evaluation.

Every common upstream step is computed once: the samples are drawn once for all arms, each ensemble
is trained once for all aggregation rules and scored once (rules re-aggregate stored member scores).
"""

from __future__ import annotations

from prefect import flow

from flows.common import Stager, flow_run_tags
from rmens.config import AggregationConfig, PipelineConfig, load_preset
from tasks.best_of_n import best_of_n
from tasks.evaluate import evaluate
from tasks.paths import ProjectPaths
from tasks.ppo import ppo
from tasks.prepare_data import prepare_data
from tasks.prepare_models import prepare_models
from tasks.refs import ArtifactRef
from tasks.report import publish, report
from tasks.sample import sample
from tasks.score import score
from tasks.tracking import parent_run
from tasks.train_ensemble import train_ensemble


def train_judge(stage: Stager, config) -> ArtifactRef | None:
    """The offline gold judge: a reward model trained on many more pairs than the arms see."""
    if config.judge.kind != "reward_model":
        return None
    judge_data = config.judge.data.model_copy(update={"val_fraction": config.judge.held_out_fraction})
    data = stage(prepare_data, "judge", data=judge_data)
    return stage(train_ensemble, "judge", data=data, ensemble=config.judge.ensemble, train_cfg=config.judge.train,
                 label="judge", registered_model=None, log_model=False)


def train_arms(stage: Stager, config: PipelineConfig, data: ArtifactRef) -> dict[str, ArtifactRef]:
    arms: dict[str, ArtifactRef] = {}
    base = config.ensemble
    for seed in range(config.arms.single_seeds):
        arms[f"single-s{seed}"] = stage(
            train_ensemble, f"single-s{seed}", data=data, train_cfg=config.train, label=f"single-s{seed}",
            ensemble=base.model_copy(update={"kind": "linear", "k": 1, "seed": base.seed + seed}),
            registered_model=config.registered_model, log_model=config.log_models)
    for kind in config.arms.kinds:
        for k in config.arms.ks:
            label = f"{kind}-k{k}"
            arms[label] = stage(train_ensemble, label, data=data, train_cfg=config.train, label=label,
                                ensemble=base.model_copy(update={"kind": kind, "k": k}),
                                registered_model=config.registered_model, log_model=config.log_models)
    return arms


@flow(name="rmens-pipeline", validate_parameters=True)
def pipeline(config: PipelineConfig | None = None, preset: str = "smoke", overrides: list[str] | None = None,
             refresh: bool = False) -> dict:
    """Run every stage of the experiment; returns {label: summary} and the Prefect state of each stage.

    Give a full `config`, or a `preset` name with dotted `overrides` (what deployments use).
    """
    from rmens.models.backbone import check_max_lengths

    config = config or load_preset(preset, overrides)
    check_max_lengths(config.trained_ensembles())  # before any stage: a too-long context fails in one line
    paths = ProjectPaths.at(config.project_dir).make()
    run_name = f"pipeline:{config.name}"
    with parent_run(paths, run_name, config, tags=flow_run_tags()) as ctx, Stager(ctx, refresh) as stage:
        stage(prepare_models, "models", names=[config.ensemble.backbone, config.policy])
        data = stage(prepare_data, "arms", data=config.data)
        judge = train_judge(stage, config)
        arms = train_arms(stage, config, data)
        refs: dict[str, ArtifactRef] = {"data": data, **({"judge": judge} if judge else {}), **arms}

        samples = stage(sample, "bon", policy=config.policy, prompts=config.bon_prompts, bon=config.bon)
        proxies = {arm: stage(score, arm, samples=samples, scorer=ref, name=arm) for arm, ref in arms.items()}
        judge_scores = stage(score, "judge", samples=samples, scorer=judge, name="judge", judge=config.judge) \
            if config.judge.kind in ("reward_model", "hf_reward_model", "local_llm") else None
        select_n = sorted(set(config.evaluate.bon_select_n))
        refs["best_of_n"] = bon = stage(best_of_n, "bon", samples=samples, proxies=proxies, judge=judge_scores,
                                        rules=config.arms.rules, select_n=select_n)

        common = {"eval_cfg": config.evaluate, "judge_cfg": config.judge, "judge": judge}
        refs["eval:initial"] = stage(evaluate, "initial", label="initial", policy=config.policy, **common)
        if config.ppo is not None:
            for spec in config.ppo_arms:
                arm, rule = config.arms.ppo_arm(spec)  # PipelineConfig validated every entry at load
                run = stage(ppo, spec, ppo_cfg=config.ppo.model_copy(update={"policy": config.policy,
                                                                          "aggregation": rule}),
                            reward=arms[arm], prompts=config.ppo_prompts, label=spec, judge_cfg=config.judge,
                            judge=judge)
                refs[f"ppo:{spec}"] = run
                refs[f"eval:ppo:{spec}"] = stage(evaluate, f"ppo:{spec}", label=f"ppo:{spec}", ppo_run=run,
                                                 proxy=arms[arm], **common)
        for name in bon_selections(arms, config.arms.rules):
            for n in select_n:
                label = f"bon:{name}:n{n}"
                refs[f"eval:{label}"] = stage(evaluate, label, label=label, bon=bon,
                                              bon_selection=f"{name.replace('/', '_')}_n{n}.jsonl", **common)
        title = f"rmens pipeline '{config.name}'"
        summary_ref = stage(report, "report", title=title, refs=refs)
        publish(ctx, summary_ref, title)
    return {"report": summary_ref.path, "parent_run_id": ctx.parent_run_id, "states": stage.states,
            "summaries": {label: ref.summary for label, ref in refs.items()}}


def bon_selections(arms: dict[str, ArtifactRef], rules: list[AggregationConfig]) -> list[str]:
    return [f"{arm}/{rule.name}" for arm in arms
            for rule in (rules if not arm.startswith("single") else [AggregationConfig(rule="mean")])]
