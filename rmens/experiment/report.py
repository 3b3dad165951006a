"""The experiment's report, generated from its results (never typed by hand): results.json and report.md,
with the primary comparison first, then the design's own checks (do the pools reward recognising systems;
does training beat the untrained twin; is the gold judge better than the proxies), then the papers' claims
with Holm-corrected verdicts (rmens.experiment.verdicts), then the tables behind them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from rmens.evaluation.curves import curve_from_points, save_curves
from rmens.evaluation.logged_bon import GROUPS, evaluation_sets
from rmens.experiment.config import ExperimentConfig
from rmens.experiment.data import MT_BENCH, pools_file
from rmens.experiment.verdicts import (
    Evidence,
    bon_claims,
    design_checks,
    finish,
    gold_check,
    ppo_claims,
    primary,
    recognition,
)
from rmens.io import atomic_write_text, write_json
from rmens.steps import Output, step


def method(cfg: ExperimentConfig) -> str:
    return ("Every arm is trained several times (runs: seeds of member initialisation and data order), and every "
            "comparison treats runs as random and pools as paired (rmens.evaluation.stats: se^2 = run variance of "
            "each side / its runs + pool variance of the paired differences / pools; Welch-Satterthwaite df; "
            "Student's t). The primary comparison was named in the config before the run and is tested alone; "
            "each other family of verdicts is corrected with Holm's method (p_holm). A single run gives no verdict. "
            f"MDD is the smallest true difference a verdict detects with {cfg.power:.0%} power at alpha / m (the "
            "strictest Holm step of a family of m; the primary: alpha), an upper bound for the family's later steps. "
            "\"No significant difference\" is not evidence of equality.")


def _json(folder: Path, name: str):
    return json.loads((Path(folder) / name).read_text())


def _clean(value):
    """nan and inf become None, so that results.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 10 ** -digits else f"{value:.{digits}f}"
    return str(value)


def _pm(value: float | None, se: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ± {se:.3f}" if se is not None and math.isfinite(se) else f"{value:.3f} (1 run: no s.e.)"


def md_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows] + [""]


def _ppo_points(cfg: ExperimentConfig, ppo_evals: dict[str, Path]) -> dict[str, list[list[dict]]]:
    """Each PPO arm's runs' evaluation points (initial policy and every checkpoint)."""
    out: dict[str, list[list[dict]]] = {}
    for ppo_arm in cfg.ppo_arms:
        runs = [ppo_evals[ppo_arm.run_label(r)] for r in range(cfg.ppo_runs) if ppo_arm.run_label(r) in ppo_evals]
        if runs:
            out[ppo_arm.label] = [_json(folder, "ppo_eval.json")["points"] for folder in runs]
    return out


@step("experiment_report")
def report_step(folder: Path, *, experiment: ExperimentConfig, pairs: Output, pools: Output, trains: dict[str, Output],
                scores: dict[str, Output], twins: Output, rewards: Output, ppo_runs: dict[str, Output],
                ppo_evals: dict[str, Output], part: str) -> dict:
    cfg, ev = experiment, Evidence.read(rewards)
    points = _ppo_points(cfg, ppo_evals)
    gold_ok, gold_rows = gold_check(cfg, ev)
    ppo = ppo_claims(cfg, points) if points else []
    alpaca_eval = [name for name in ev.sets() if name != MT_BENCH]
    claims = finish(bon_claims(cfg, ev, alpaca_eval, "claims") + (ppo if gold_ok else []), cfg.alpha, cfg.power)
    for claim in [] if gold_ok else ppo:
        claim.update(p_holm=None, mdd=None, verdict="withheld (the gold judge is not better than the proxies)")
    mt_bench = bon_claims(cfg, ev, [MT_BENCH], "mt_bench") if MT_BENCH in ev.sets() else []
    results = {"size": cfg.size, "part": part, "config": cfg.model_dump(mode="json"), "method": method(cfg),
               "split": _json(pairs, "split.json"),
               "pools": _json(pools, "pools.json"), "primary": primary(cfg, ev),
               "recognition": recognition(ev), "checks": finish(design_checks(cfg, ev), cfg.alpha, cfg.power),
               "claims": claims + ([] if gold_ok else ppo), "mt_bench_claims": finish(mt_bench, cfg.alpha, cfg.power),
               "gold_check": {"ok": gold_ok, "rows": gold_rows, "min_margin": cfg.gold.min_margin},
               "train": {label: _json(f, "train_summary.json") for label, f in trains.items()},
               "score": {label: _json(f, "score_summary.json") for label, f in scores.items()},
               "twins": _json(twins, "twins_summary.json"), "reward_models": ev.agreement, "logged_bon": ev.bon,
               "ppo": {label: {**_json(ppo_runs[label], "ppo_summary.json"), **_json(f, "ppo_eval.json")}
                       for label, f in ppo_evals.items()}}
    results = _clean(results)
    names = ["logged_bon.json", "logged_bon.csv", "rm_eval.json",
             *(f"logged_bon_{s}.png" for s in ev.sets()), *(pools_file(s) for s in ev.sets())]
    for name in names:
        shutil.copy2(Path(rewards) / name, folder / name)
    if results["ppo"]:
        curves = {f"{label} {key}": curve for label, res in results["ppo"].items()
                  for key, curve in curve_from_points(res["points"], ["gold", "proxy"]).items()}
        save_curves(curves, "rl", folder / "ppo_curves", "PPO: gold and proxy reward against sqrt(KL)")
    write_json(folder / "results.json", results)
    atomic_write_text(folder / "report.md", "\n".join(markdown(cfg, results)))
    return {"claims": len(results["claims"]), "claims_agreeing": sum(c["verdict"] == "agrees" for c in claims),
            "primary_verdict": results["primary"]["verdict"], "ppo_runs": len(ppo_evals), "gold_check": gold_ok}


# -- markdown ---------------------------------------------------------------------------------------

def markdown(cfg: ExperimentConfig, r: dict) -> list[str]:
    lines = [f"# rmens reference experiment: size `{cfg.size}`", "", *design(cfg, r)]
    lines += primary_section(r["primary"])
    lines += recognition_section(r)
    lines += paper_table(cfg, r)
    tested = sum(c["p_holm"] is not None for c in r["claims"])
    lines += ["## What agrees with the papers and what does not", "",
              "The papers' claims at each AlpacaEval set's largest n (and PPO at matched KL, unless withheld), one "
              f"family: p_holm is Holm-corrected over its {tested} tests. {method(cfg)}", ""]
    lines += claims_table(r["claims"])
    if r["mt_bench_claims"]:
        lines += ["The same claims on MT-Bench's graded pools, a family of their own (Holm within it). These pools "
                  "hold every system of the grades file, some of which, or their relatives, answer in the training "
                  "verdicts: read them beside MT-Bench's system_prior line above.", ""]
        lines += claims_table(r["mt_bench_claims"])
    lines += ["## Checks of the design: does training beat the untrained twin?", "",
              "Each arm against its untrained twin (same seeds, no training step; rmens.experiment.twins), paired run "
              "by run: held-out agreement per pool, and Best-of-n at the largest n under the arm's first rule. One "
              "family, Holm-corrected.", ""]
    lines += claims_table(r["checks"])
    lines += cost_table(cfg, r)
    lines += bon_tables(r["logged_bon"])
    lines += ppo_section(r)
    return lines


def design(cfg: ExperimentConfig, r: dict) -> list[str]:
    s, p = r["split"], r["pools"]
    held = r["logged_bon"]["held_out_generators"]
    sets = [f"{j.upper()} {p[f'pools_{j}']} pools of {p[f'held_out_systems_{j}']} held-out systems"
            for j in cfg.pools.judges]
    if "pools_mt_bench" in p:
        sets.append(f"MT-Bench {p['pools_mt_bench']} question-turn pools of {p['mt_bench_systems']} systems "
                    f"({p['mt_bench_systems_with_prior']} with an AlpacaEval prior)")
    runs = ", ".join(f"{arm.label} x{cfg.runs_of(arm)}" for arm in cfg.arms)
    return [f"Evaluation instructions from `{s['eval_source']}`"
            + (" (held out by a hash of the instruction)" if s["held_out_by_hash"] else "")
            + f": {s['evaluation_instructions']}, none in any training set. Held-out systems (by a hash of the system "
            f"family, {cfg.data.generator_fraction:g} of them; listed in logged_bon.json): "
            + "; ".join(f"{j.upper()} {len(v)}" for j, v in held.items())
            + "; no output of theirs, or of a system of their family, is in any training set, and the AlpacaEval "
            f"pools hold only theirs (MT-Bench's hold every system of the grades file). Pools: {'; '.join(sets)}. "
            f"Training verdicts from `{s['train_source']}` (other systems, other instructions): gold judge "
            f"{s['gold_pairs']} pairs ({s['gold_instructions']} instructions), proxies {s['proxy_pairs']} pairs "
            f"({s['proxy_instructions']} instructions), PPO prompts {s['ppo_prompts']} of {s['ppo_instructions']} "
            f"unlabelled instructions. Backbone `{cfg.ensemble.backbone}` at {cfg.ensemble.max_length} tokens (gold "
            f"judge: {cfg.gold.ensemble.max_length}). Training runs per arm: {runs}. Every rule aggregates members "
            "standardised on training responses; agreement and ECE use each model's raw Bradley-Terry scale.", ""]


def primary_section(c: dict) -> list[str]:
    plan = c["plan"]
    needed = plan.get("runs_needed")
    if needed:
        power = (f"With the variance parts measured here (run sd {_fmt(plan['run_sd_a'])} / {_fmt(plan['run_sd_b'])}, "
                 f"pool sd {_fmt(plan['pool_sd'])}), detecting {plan['target']} takes "
                 + ", ".join(f"{v if v else 'more than 100'} runs per arm at {k} pools" for k, v in needed.items())
                 + " (at the power and alpha of this comparison, with the degrees of freedom those runs would give).")
    else:
        power = "Its variance parts could not be estimated (a side with one run), so no power plan is given."
    return ["## The primary comparison (named in the config before the run)", "",
            f"{c['claim']}: {c['a']} {c['a_value']:.3f} against {c['b']} {c['b_value']:.3f}, difference "
            f"{_pm(c['diff'], c['se'])} (df {_fmt(c['df'], 1)}, p {_fmt(c['p'])}; runs {c['runs_a']} and "
            f"{c['runs_b']}, "
            f"{c['pools']} pools). Verdict: **{c['verdict']}**. Minimum detectable difference: {_fmt(c['mdd'])}. "
            + power, ""]


def recognition_section(r: dict) -> list[str]:
    lines = ["## Do the pools test Best-of-n, or recognising systems?", "",
             "system_prior scores each output by nothing but its system's mean verdict on training instructions (for "
             "MT-Bench: its AlpacaEval win rate, where the system appears there). The AlpacaEval pools hold only "
             "held-out systems, none of whose outputs trained any model here, so no arm can gain by recognising "
             "them; MT-Bench's pools hold every system of the grades file, some of which (or their relatives) "
             "answer in the training verdicts. Where system_prior still beats a random pick by more than two "
             "standard errors, the pools mix systems of different quality: part of what Best-of-n measures on them "
             "is telling a better system's answer from a worse one's, which one policy's samples (the papers' "
             "setting) would not offer. On MT-Bench only the systems with an AlpacaEval counterpart have a prior "
             "(the rest tie at the mean prior), so its line understates what recognition could reach.", ""]
    for c in r["recognition"]:
        said = ("**does**: these pools still reward telling systems apart" if c["recognition"]
                else "does not, by two standard errors")
        lines.append(f"- {c['set']}, n={c['n']}: system_prior {c['a_value']:.3f} against random {c['b_value']:.3f}, "
                     f"{_pm(c['diff'], c['se'])}: it {said}.")
    return lines + [""]


def _series(r: dict, name: str, group: str, series: str) -> dict | None:
    rows = evaluation_sets(r["logged_bon"])[name].get(group, {}).get(series)
    return rows[-1] if rows else None


def paper_table(cfg: ExperimentConfig, r: dict) -> list[str]:
    """Zhang et al.'s Table 1 in shape: one row per arm, Best-of-n at each set's largest n under the mean (mean
    over runs ± s.e., runs random), its untrained twin, and the best rule."""
    sets = list(evaluation_sets(r["logged_bon"]))
    header = ["reward model", "runs"]
    for name in sets:
        header += [f"BoN {name} mean", f"{name} untrained", f"{name} best rule"]
    rows = []
    for arm in cfg.arms:
        row = [arm.label, cfg.runs_of(arm)]
        for name in sets:
            metric = evaluation_sets(r["logged_bon"])[name]["metric"]
            mean = _series(r, name, "arms", f"{arm.label}/mean")
            twin = _series(r, name, "twins", f"{arm.label}/mean")
            ruled = [(rule.name, _series(r, name, "arms", f"{arm.label}/{rule.name}")) for rule in arm.rules(cfg.rules)]
            best = max(ruled, key=lambda named: named[1][metric])
            row += [_pm(mean[metric], mean["se"]), f"{twin[metric]:.3f}",
                    f"{_pm(best[1][metric], best[1]['se'])} ({best[0]})"]
        rows.append(row)
    for base in ("random", "longest", "system_prior", "best"):
        row = [f"{base} (baseline)", "-"]
        for name in sets:
            value = _series(r, name, "baselines", base)
            row += [f"{value[evaluation_sets(r['logged_bon'])[name]['metric']]:.3f}" if value else "-", "-", "-"]
        rows.append(row)
    return ["## The paper's table (Zhang et al. 2024, Table 1 in shape)", "",
            "Best-of-n over logged outputs at each set's largest n: AlpacaEval win rate against the reference (real "
            "GPT-4 verdicts), MT-Bench mean GPT-4 grade. Mean over runs ± s.e. with runs random. The best rule is "
            "the best of the arm's rules chosen after the fact, so it is optimistic; the verdicts test each rule "
            "named in advance.", ""] + \
        md_table(header, rows)


def claims_table(claims: list[dict]) -> list[str]:
    rows = [[c["source"], c["claim"], c["setting"], c["a"], c["b"], c["a_value"], c["b_value"], _pm(c["diff"], c["se"]),
             f"{c['runs_a']}/{c['runs_b']}", c["p"], c["p_holm"], c["mdd"], c["verdict"]] for c in claims]
    return md_table(["source", "claim", "setting", "a", "b", "a value", "b value", "a - b ± s.e.", "runs", "p",
                     "p_holm", "MDD", "verdict"], rows)


def _spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")


def cost_table(cfg: ExperimentConfig, r: dict) -> list[str]:
    """Per arm: cost (mean over runs) and held-out agreement (mean ± sd over runs) beside its untrained twin."""
    sets = list(r["reward_models"])
    header = ["arm", "runs", "pairs", "steps", "train s", "train peak MiB", "score s"]
    for name in sets:
        header += [f"{name} acc", f"{name} untrained", f"{name} acc longer lost", f"{name} ECE",
                   f"{name} ECE untrained"]
    groups = [("gold", ["gold"], [])] + [(arm.label, [arm.run_label(i) for i in range(cfg.runs_of(arm))],
                                          [f"twin:{arm.run_label(i)}" for i in range(cfg.runs_of(arm))])
                                         for arm in cfg.arms]
    rows = []
    for name, labels, twins in groups:
        train = [r["train"][label] for label in labels]
        row = [name, len(labels), train[0]["pairs"], train[0]["steps"], _spread([t["train_wall_s"] for t in train]),
               _spread([t["train_peak_over_start_mib"] if t["memory"] == "rss" else t["train_peak_mib"]
                        for t in train]),
               _spread([r["score"][label]["score_wall_s"] for label in labels])]
        for s in sets:
            metrics = r["reward_models"][s]
            row += [_spread([metrics[label]["accuracy"] for label in labels]),
                    _spread([metrics[t]["accuracy"] for t in twins]) if twins else "-",
                    _spread([metrics[label]["accuracy_longer_lost"] for label in labels]),
                    _spread([metrics[label].get("ece") for label in labels]),
                    _spread([metrics[t].get("ece") for t in twins]) if twins else "-"]
        rows.append(row)
    row = ["the longer output wins", "-", "-", "-", "-", "-", "-"]
    for s in sets:
        row += [r["reward_models"][s]["gold"]["length_rule_accuracy"], "-", 0.0, "-", "-"]
    rows.append(row)
    memory = ("PyTorch's peak allocated GPU memory" if r["train"]["gold"]["memory"] == "cuda" else
              "the process's peak resident memory above its level when the run's training started")
    return ["## Reward models: cost and held-out agreement with the judge", "",
            "Accuracy on decided held-out verdicts (AlpacaEval: output against reference; MT-Bench: two answers with "
            "different grades), overall and where the longer output lost, mean ± sd over runs, beside the untrained "
            "twins; the last row is the length rule on the same pairs. Cost is per run (a full ensemble's: its member "
            f"steps' wall times and its assembly's summed, the largest step's peak); peak memory: {memory}. "
            f"Untrained twins: {r['twins']['twins']} runs scored in one backbone pass, "
            f"{r['twins']['twins_wall_s']:.0f} s.",
            ""] + md_table(header, rows)


def bon_tables(bon: dict) -> list[str]:
    lines = []
    for name, entry in evaluation_sets(bon).items():
        metric = entry["metric"]
        lines += [f"## Best-of-n over logged outputs: {entry['judge_name']}", "",
                  f"{entry['n_pools']} pools of {entry['pool_sizes']} outputs. {metric.replace('_', ' ')} ± s.e. (runs "
                  "random; baselines and the gold judge: over pools) and, in brackets, the mean length of the pick in "
                  "characters. KL: the pick distribution's exact KL from the pool's uniform distribution, for picks "
                  f"without ties (log n - (n-1)/n assumes independent draws). Curves: logged_bon_{name}.png.", ""]
        header = ["group", "series"] + [f"n={row['n']} (KL {row['kl_bon']:.2f})"
                                        for row in entry["baselines"]["shortest"]]
        rows = [[group, series] + [f"{row[metric]:.3f} ± {_fmt(row['se'])} ({row['mean_length']:.0f})" for row in rows]
                for group in GROUPS for series, rows in entry.get(group, {}).items()]
        lines += md_table(header, rows)
    return lines


def ppo_section(r: dict) -> list[str]:
    check = r["gold_check"]
    lines = ["## The gold judge and PPO", ""]
    failing = [row for row in check["rows"] if not row["ok"]]
    lines += [f"PPO is judged by the gold reward model, so its verdicts stand only where the gold judge agrees with "
              f"the held-out verdicts better than every proxy arm, by at least {check['min_margin']} of accuracy and "
              "with the one-sided lower confidence bound of the difference above 0 (per-pool accuracies paired, the "
              "arm's runs random): "
              + ("it does on every judge set." if check["ok"] else
                 "it does not (" + "; ".join(f"{row['set']}: gold {row['gold']:.3f} against {row['arm']} "
                                               f"{row['proxy']:.3f}, lower bound {_fmt(row['lower_bound'])}"
                                               for row in failing[:6])
                 + "), so **the PPO verdicts are withheld** and PPO's numbers below describe the runs only."), ""]
    if not r["ppo"]:
        return lines + (["PPO: not run in this part (`--part rewards`).", ""] if r["part"] != "all" else [])
    judges = list(r["logged_bon"]["judges"])
    header = ["PPO run", "steps", "final KL", "proxy gain", "gold gain", "chars initial -> final"]
    header += [f"gold win vs {j} ref, initial -> final" for j in judges] + ["PPO s"]
    rows = []
    for label, res in r["ppo"].items():
        sm = res["summary"]
        row = [label, sm["final_step"], sm["final_kl"], sm["proxy_gain"], sm["gold_gain"],
               f"{sm['initial_response_chars']:.0f} -> {sm['final_response_chars']:.0f}"]
        row += [f"{_pm(sm[f'initial_gold_win_rate_{j}'], sm[f'initial_gold_win_rate_{j}_se'])} -> "
                f"{_pm(sm[f'final_gold_win_rate_{j}'], sm[f'final_gold_win_rate_{j}_se'])}" for j in judges]
        rows.append(row + [res["ppo_wall_s"]])
    return lines + ["Answers of each run's initial policy and checkpoints to held-out instructions; gold win rate "
                    "against each judge set's reference output (sigmoid of the gold reward difference; ± over "
                    "prompts). The verdicts above compare PPO arms at matched KL (the largest KL all their runs "
                    "reached, interpolated between checkpoints). Curves: ppo_curves/curves.png.", ""] + \
        md_table(header, rows)
