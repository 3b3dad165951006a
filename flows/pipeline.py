"""The whole chain over a matrix of arms: data -> judge -> ensembles -> Best-of-n -> PPO -> evaluation.

Every common upstream step is computed once: the samples are drawn once for all arms, each ensemble
is trained once for all aggregation rules and scored once (rules re-aggregate stored member scores).
"""

from __future__ import annotations

from prefect import flow

from flows.steps import train_arms, train_judge
from rmens.config import PipelineConfig, derive, load_preset
from rmens.preflight import check_before_work
from tasks.best_of_n import best_of_n
from tasks.evaluate import evaluate
from tasks.ppo import ppo
from tasks.prepare_data import prepare_data
from tasks.prepare_models import prepare_models
from tasks.report import publish, report
from tasks.runtime.paths import ProjectPaths
from tasks.runtime.refs import ArtifactRef
from tasks.runtime.stager import Stager, flow_run_name, flow_run_tags
from tasks.runtime.tracking import parent_run
from tasks.runtime.uptodate import code_on_disk, record_last_run
from tasks.sample import sample
from tasks.score import score


@flow(name="rmens-pipeline", flow_run_name=flow_run_name("pipeline"), validate_parameters=True)
def pipeline(config: PipelineConfig | None = None, preset: str = "smoke", overrides: list[str] | None = None,
             refresh: bool = False) -> dict:
    """Run every stage of the experiment; returns {label: summary} and the Prefect state of each stage.

    Give a full `config`, or a `preset` name with dotted `overrides` (what deployments use).
    """
    config = config or load_preset(preset, overrides)
    check_before_work(config)
    paths = ProjectPaths.at(config.project_dir).make()
    code = code_on_disk()  # before any stage key: see record_last_run
    run_name = f"pipeline:{config.name}"
    with parent_run(paths, run_name, config, tags=flow_run_tags()) as ctx, Stager(ctx, refresh) as stage:
        stage(prepare_models, "models", names=[config.ensemble.backbone, config.policy])
        data = stage(prepare_data, "arms", data=config.data)
        judge = train_judge(stage, config)
        arms = train_arms(stage, config, data)
        refs: dict[str, ArtifactRef] = {"data": data, **({"judge": judge} if judge else {}),
                                        **{arm.label: ref for arm, ref in arms.items()}}

        samples = stage(sample, "bon", policy=config.policy, prompts=config.bon_prompts, bon=config.bon)
        proxies = {arm.label: stage(score, arm.label, tags=arm.describe(), samples=samples, scorer=ref, name=arm.label)
                   for arm, ref in arms.items()}
        judge_scores = stage(score, "judge", samples=samples, scorer=judge, name="judge", judge=config.judge) \
            if config.judge.kind in ("reward_model", "hf_reward_model", "local_llm") else None
        selections = config.selections()
        refs["best_of_n"] = bon = stage(best_of_n, "bon", samples=samples, proxies=proxies, judge=judge_scores,
                                        arms=list(arms), rules=config.arms.rules,
                                        select_n=sorted({s.n for s in selections}))

        common = {"eval_cfg": config.evaluate, "judge_cfg": config.judge, "judge": judge}
        refs["eval:initial"] = stage(evaluate, "initial", label="initial", policy=config.policy, **common)
        for run_spec in config.ppo_runs():
            label, tags, proxy = run_spec.label, run_spec.describe(), arms[run_spec.arm]
            ppo_cfg = derive(config.ppo, policy=config.policy, aggregation=run_spec.rule)
            run = stage(ppo, label, tags=tags, ppo_cfg=ppo_cfg, reward=proxy, prompts=config.ppo_prompts, label=label,
                        judge_cfg=config.judge, judge=judge)
            refs[f"ppo:{label}"] = run
            refs[f"eval:ppo:{label}"] = stage(evaluate, f"ppo:{label}", tags=tags, label=f"ppo:{label}", ppo_run=run,
                                              proxy=proxy, **common)
        for pick in selections:
            refs[f"eval:{pick.label}"] = stage(evaluate, pick.label, tags=pick.describe(), label=pick.label, bon=bon,
                                               bon_selection=pick, **common)
        title = f"rmens pipeline '{config.name}'"
        summary_ref = stage(report, "report", title=title, refs=refs)
        publish(ctx, summary_ref, title)
    record_last_run(paths, "pipeline", config, code, ctx.parent_run_id, summary_ref.path, stage.outputs)
    return {"report": summary_ref.path, "parent_run_id": ctx.parent_run_id, "states": stage.states,
            "summaries": {label: ref.summary for label, ref in refs.items()}}
