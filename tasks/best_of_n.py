"""Stage: Best-of-n curves for every (ensemble, rule) from stored member scores and the judge's scores."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from rmens.config import AggregationConfig
from rmens.io import write_jsonl
from tasks.common import run_stage, stage_task
from tasks.refs import ArtifactRef
from tasks.tracking import StageContext, client_for, log_metrics


def proxy_matrix(score_ref: ArtifactRef, name: str, rule: AggregationConfig):
    from rmens.bon import load_member_scores
    from rmens.models.aggregate import aggregate_with

    members = load_member_scores(score_ref.require().folder / f"{name}.jsonl")  # [k, P, N]
    k, prompts, n = members.shape
    return aggregate_with(members.reshape(k, prompts * n), rule).reshape(prompts, n)


@stage_task("best_of_n", timeout_seconds=3600)
def best_of_n(ctx: StageContext, samples: ArtifactRef, proxies: dict[str, ArtifactRef], judge: ArtifactRef | None,
              rules: list[AggregationConfig], select_n: list[int]) -> ArtifactRef:
    """`proxies` maps arm names to score artifacts; rules apply to every arm with more than one member."""

    def build(folder: Path, run_id: str) -> dict:
        from rmens.bon import bon_curve, load_member_scores, select_best
        from rmens.evaluation.curves import curve_from_bon, save_curves

        gold = {"judge": load_member_scores(judge.require().folder / "judge.jsonl")[0]} if judge else {}
        results, summary = {}, {}
        for arm, ref in proxies.items():
            arm_rules = rules if not arm.startswith("single") else [AggregationConfig(rule="mean")]
            for rule in arm_rules:
                name = f"{arm}/{rule.name}"
                proxy = proxy_matrix(ref, arm, rule)
                rows = bon_curve(proxy, gold)
                results[name] = rows
                curve_dir = folder / "curves" / name.replace("/", "_")
                save_curves(curve_from_bon(rows, ["proxy", *gold]), "bon", curve_dir, f"Best-of-n: {name}")
                mlflow.log_artifacts(str(curve_dir), f"curves/{name.replace('/', '_')}")
                for n in select_n:
                    picked = select_best(samples.folder, arm, n, scores=proxy)
                    write_jsonl(folder / "selected" / f"{name.replace('/', '_')}_n{n}.jsonl", picked)
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

    return run_stage(ctx, "best_of_n", {"samples": samples, "proxies": proxies, "judge": judge, "rules": rules,
                                       "select_n": select_n}, build)
