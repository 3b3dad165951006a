"""Pipeline steps of Best-of-n: draw N samples per prompt once, score them with each scorer once, and
aggregate stored member scores into a curve per (arm run, rule) and the selections the evaluation reads."""

from __future__ import annotations

import time
from pathlib import Path

from rmens.arms import Arm
from rmens.bon_config import BonConfig
from rmens.data.config import PromptsConfig
from rmens.data.sources import engine_paths, model_paths, paths_read
from rmens.io import write_json, write_jsonl
from rmens.models.config import AggregationConfig
from rmens.pipeline.config import GoldConfig, Selection, series
from rmens.pipeline.gold import gold_paths, load_gold
from rmens.steps import Output, report_metrics, step


@step("sample", devices=1, memory_gib=4, files={"samples": "."},
      reads=lambda policy, prompts, bon, **_: model_paths(policy) + paths_read(prompts) + engine_paths(bon.generation))
def sample(folder: Path, *, policy: str, prompts: PromptsConfig, bon: BonConfig) -> dict:
    from rmens.bon import draw_samples
    from rmens.data.prompts import load_prompts
    from rmens.generation import open_sampler

    texts = load_prompts(prompts)
    with open_sampler(policy, bon.generation) as sampler:
        started = time.perf_counter()
        rows = draw_samples(sampler, texts, bon, folder)
        seconds = time.perf_counter() - started
    return {"prompts": len(texts), "samples": len(rows), "n_samples": bon.n_samples,
            "samples_per_s": len(rows) / seconds,
            "mean_tokens": sum(r["n_tokens"] for r in rows) / len(rows),
            "finished_fraction": sum(r["finished"] for r in rows) / len(rows)}


@step("score", devices=1, memory_gib=4, files={"scores": "."}, reads=lambda gold=None, **_: gold_paths(gold))
def score(folder: Path, *, samples: Output, scorer: Output | None, name: str, gold: GoldConfig | None = None) -> dict:
    """An ensemble output scores with all its members; with `gold` set, the gold scores instead."""
    from rmens.bon import score_samples
    from rmens.reward import EnsembleReward

    fn = load_gold(gold, scorer) if gold is not None else EnsembleReward.from_folder(scorer.file("ensemble"))
    paths = score_samples(samples.file("samples"), {name: fn}, scores_dir=folder)
    return {"scored": sum(1 for _ in paths[name].open())}


def proxy_matrix(scores: Output, name: str, rule: AggregationConfig):
    """[prompts, N] aggregated rewards of one arm run's stored member scores under `rule`."""
    from rmens.bon import load_member_scores
    from rmens.models.aggregate import aggregate_with

    members = load_member_scores(scores.require().file("scores") / f"{name}.jsonl")  # [k, P, N]
    k, prompts, n = members.shape
    return aggregate_with(members.reshape(k, prompts * n), rule).reshape(prompts, n)


@step("best_of_n", files={"curves": "bon_curves.json", "selected": "selected"})
def best_of_n(folder: Path, *, samples: Output, proxies: dict[str, Output], gold: Output | None, arms: list[Arm],
              runs: dict[str, int], rules: list[AggregationConfig], select_n: list[int]) -> dict:
    """`proxies` maps run labels to score outputs; each of `runs[arm.label]` runs of each arm is aggregated
    with each of the arm's rules."""
    from rmens.bon import bon_curve, load_member_scores, select_best
    from rmens.evaluation.curves import curve_from_bon, save_curves

    golds = {"gold": load_member_scores(gold.require().file("scores") / "gold.jsonl")[0]} if gold else {}
    results, summary = {}, {}
    for arm in arms:
        for run in range(runs[arm.label]):
            label = arm.run_label(run)
            for rule in arm.rules(rules):
                name = series(arm, run, rule)
                proxy = proxy_matrix(proxies[label], label, rule)
                rows = results[name] = bon_curve(proxy, golds)
                save_curves(curve_from_bon(rows, ["proxy", *golds]), "bon", folder / "curves" / name.replace("/", "_"),
                            f"Best-of-n: {name}")
                for n in select_n:
                    write_jsonl(folder / "selected" / Selection(arm=arm, run=run, rule=rule, n=n).file_name,
                                select_best(samples.file("samples"), label, n, scores=proxy))
                summary.update(_bon_summary(name, rows))
    write_json(folder / "bon_curves.json", results)
    return summary


def _bon_summary(name: str, rows: list[dict]) -> dict[str, float]:
    """The proxy's (and the gold's) score of the pick at the largest n, and their curves to the tracker, as
    `<metric>/<arm run>/<rule>`: MLflow's charts group by what precedes the first slash, so each metric is one
    section with a chart per arm and rule (the scheme of the flow's parent run too)."""
    for row in rows:
        report_metrics(row["n"], {f"{k}/{name}": v for k, v in row.items() if k in ("proxy", "gold")})
    last = rows[-1]
    return {f"proxy_at_N/{name}": last["proxy"],
            **({f"gold_at_N/{name}": last["gold"], f"gold_gain/{name}": last["gold"] - rows[0]["gold"]}
               if "gold" in last else {})}
