"""Pipeline steps of Best-of-n: draw N samples per prompt once, score them with each scorer once, and
aggregate stored member scores into a curve per (arm, rule) and the selections the evaluation reads."""

from __future__ import annotations

from pathlib import Path

from rmens.config import AggregationConfig, Arm, BonConfig, JudgeConfig, PromptsConfig, Selection
from rmens.data.sources import model_paths, paths_read
from rmens.io import write_json, write_jsonl
from rmens.steps import Output, report_metrics, step


@step("sample", devices=1, memory_gib=4, files={"samples": "."},
      reads=lambda policy, prompts, **_: model_paths(policy) + paths_read(prompts))
def sample(folder: Path, *, policy: str, prompts: PromptsConfig, bon: BonConfig) -> dict:
    from rmens.bon import draw_samples
    from rmens.data.prompts import load_prompts
    from rmens.models.backbone import load_policy, load_tokenizer

    texts = load_prompts(prompts)
    rows = draw_samples(load_policy(policy), load_tokenizer(policy, padding_side="left"), texts, bon, folder)
    return {"prompts": len(texts), "samples": len(rows), "n_samples": bon.n_samples,
            "mean_tokens": sum(r["n_tokens"] for r in rows) / len(rows),
            "finished_fraction": sum(r["finished"] for r in rows) / len(rows)}


@step("score", devices=1, memory_gib=4, files={"scores": "."}, reads=lambda judge=None, **_: paths_read(judge))
def score(folder: Path, *, samples: Output, scorer: Output | None, name: str, judge: JudgeConfig | None = None) -> dict:
    """An ensemble output scores with all its members; with `judge` set, the judge scores instead."""
    from rmens.bon import score_samples
    from rmens.pipeline.judging import load_judge
    from rmens.reward import EnsembleReward

    fn = load_judge(judge, scorer) if judge is not None else EnsembleReward.from_folder(scorer.file("ensemble"))
    paths = score_samples(samples.file("samples"), {name: fn}, scores_dir=folder)
    return {"scored": sum(1 for _ in paths[name].open())}


def proxy_matrix(scores: Output, name: str, rule: AggregationConfig):
    """[prompts, N] aggregated rewards of one arm's stored member scores under `rule`."""
    from rmens.bon import load_member_scores
    from rmens.models.aggregate import aggregate_with

    members = load_member_scores(scores.require().file("scores") / f"{name}.jsonl")  # [k, P, N]
    k, prompts, n = members.shape
    return aggregate_with(members.reshape(k, prompts * n), rule).reshape(prompts, n)


@step("best_of_n", files={"curves": "bon_curves.json", "selected": "selected"})
def best_of_n(folder: Path, *, samples: Output, proxies: dict[str, Output], judge: Output | None, arms: list[Arm],
              rules: list[AggregationConfig], select_n: list[int]) -> dict:
    """`proxies` maps arm labels to score outputs; each arm is aggregated with each of its rules."""
    from rmens.bon import bon_curve, load_member_scores, select_best
    from rmens.evaluation.curves import curve_from_bon, save_curves

    gold = {"judge": load_member_scores(judge.require().file("scores") / "judge.jsonl")[0]} if judge else {}
    results, summary = {}, {}
    for arm in arms:
        for rule in arm.rules(rules):
            name = arm.rule_label(rule)
            proxy = proxy_matrix(proxies[arm.label], arm.label, rule)
            rows = bon_curve(proxy, gold)
            results[name] = rows
            save_curves(curve_from_bon(rows, ["proxy", *gold]), "bon", folder / "curves" / arm.rule_folder(rule),
                        f"Best-of-n: {name}")
            for n in select_n:
                picked = select_best(samples.file("samples"), arm.label, n, scores=proxy)
                write_jsonl(folder / "selected" / Selection(arm=arm, rule=rule, n=n).file_name, picked)
            last = rows[-1]
            # `<metric>/<arm>/<rule>`: MLflow's charts group by what precedes the first slash, so each metric is
            # one section with a chart per arm and rule (the scheme of the flow's parent run too).
            summary[f"proxy_at_N/{name}"] = last["proxy"]
            if gold:
                summary[f"judge_at_N/{name}"] = last["judge"]
                summary[f"judge_gain/{name}"] = last["judge"] - rows[0]["judge"]
            for row in rows:
                report_metrics(row["n"], {f"{k}/{name}": v for k, v in row.items() if k in ("proxy", "judge")})
    write_json(folder / "bon_curves.json", results)
    return summary
