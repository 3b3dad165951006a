"""Stage: Best-of-n curves for every (ensemble, rule) from stored member scores and the judge's scores."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from rmens.config import AggregationConfig, Arm, Selection
from rmens.io import write_jsonl
from tasks.runtime.refs import ArtifactRef
from tasks.runtime.stage import run_stage, stage_task
from tasks.runtime.tracking import StageContext, client_for, log_metrics


def proxy_matrix(score_ref: ArtifactRef, name: str, rule: AggregationConfig):
    from rmens.bon import load_member_scores
    from rmens.models.aggregate import aggregate_with

    members = load_member_scores(score_ref.require().folder / f"{name}.jsonl")  # [k, P, N]
    k, prompts, n = members.shape
    return aggregate_with(members.reshape(k, prompts * n), rule).reshape(prompts, n)


@stage_task("best_of_n", timeout_seconds=3600)
def best_of_n(ctx: StageContext, samples: ArtifactRef, proxies: dict[str, ArtifactRef], judge: ArtifactRef | None,
              arms: list[Arm], rules: list[AggregationConfig], select_n: list[int]) -> ArtifactRef:
    """`proxies` maps arm labels to score artifacts; each arm is aggregated with each of its rules."""

    def build(folder: Path, run_id: str) -> dict:
        from rmens.bon import bon_curve, load_member_scores, select_best
        from rmens.evaluation.curves import curve_from_bon, save_curves

        gold = {"judge": load_member_scores(judge.require().folder / "judge.jsonl")[0]} if judge else {}
        results, summary = {}, {}
        for arm in arms:
            for rule in arm.rules(rules):
                name = arm.rule_label(rule)
                proxy = proxy_matrix(proxies[arm.label], arm.label, rule)
                rows = bon_curve(proxy, gold)
                results[name] = rows
                curve_dir = folder / "curves" / arm.rule_folder(rule)
                save_curves(curve_from_bon(rows, ["proxy", *gold]), "bon", curve_dir, f"Best-of-n: {name}")
                mlflow.log_artifacts(str(curve_dir), f"curves/{arm.rule_folder(rule)}")
                for n in select_n:
                    selection = Selection(arm=arm, rule=rule, n=n)
                    picked = select_best(samples.folder, arm.label, n, scores=proxy)
                    write_jsonl(folder / "selected" / selection.file_name, picked)
                last = rows[-1]
                summary[f"{name}/proxy_at_N"] = last["proxy"]
                if gold:
                    summary[f"{name}/judge_at_N"] = last["judge"]
                    summary[f"{name}/judge_gain"] = last["judge"] - rows[0]["judge"]
                for row in rows:
                    log_metrics(client_for(ctx), run_id, {f"{name}/{k}": v for k, v in row.items()
                                                           if k in ("proxy", "judge")}, step=row["n"])
        (folder / "bon_curves.json").write_text(json.dumps(results, indent=2))
        mlflow.log_artifact(str(folder / "bon_curves.json"))
        return summary

    return run_stage(ctx, "best_of_n", {"samples": samples, "proxies": proxies, "judge": judge, "arms": arms,
                                       "rules": rules, "select_n": select_n}, build)
