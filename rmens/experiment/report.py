"""The experiment's report, generated from its results (never typed by hand): results.json, report.md
with tables in the shape of Zhang et al.'s and Coste et al.'s, and, for each of their claims, what these
results say about it with a paired standard error over instructions.

A difference counts as evidence when it is at least twice its standard error; otherwise the report
says the results show no significant difference. Standard errors are over instructions only (the
seeds of the single models are averaged first), so they understate the spread across training runs.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from rmens.evaluation.curves import curve_from_points, save_curves
from rmens.experiment.config import ExperimentConfig
from rmens.io import atomic_write_text

SINGLE = "single (mean of seeds)"
CONSERVATIVE = ("min", "lcb", "uwo")


def _json(folder: Path, name: str):
    return json.loads((Path(folder) / name).read_text())


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over instructions and its standard error."""
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, math.nan
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def verdict(diff: float, se: float, expected: str) -> str:
    """expected: 'higher' (the claim is that a beats b) or 'similar' (a matches b)."""
    if not math.isfinite(se):
        return "undetermined (one instruction)"
    z = diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0
    if expected == "similar":
        return "consistent (no significant difference)" if abs(z) < 2 else ("better here" if z > 0 else "disagrees")
    if z >= 2:
        return "agrees"
    return "disagrees (significantly worse)" if z <= -2 else "not reproduced (no significant difference)"


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pm(value: float, se: float) -> str:
    return f"{value:.3f} ± {se:.3f}" if math.isfinite(se) else f"{value:.3f}"


def at_largest_n(claims: list[dict], logged_bon: dict) -> list[dict]:
    """The PPO claims and the Best-of-n claims at each judge's largest n (the report's headline)."""
    return [c for c in claims if "n" not in c or c["n"] == logged_bon["judges"][c["judge"]]["ns"][-1]]


def md_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows] + [""]


def _average(series: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per n and instruction, the average of several series' expected verdicts."""
    return {n: [sum(v) / len(v) for v in zip(*(one[n] for one in series))] for n in series[0]}


class Results:
    """Everything the steps wrote, in one place, with the single seeds averaged."""

    def __init__(self, cfg: ExperimentConfig, data: Path, trains: dict[str, Path], scores: dict[str, Path],
                 rewards: Path, ppo_runs: dict[str, Path], ppo_evals: dict[str, Path]):
        self.cfg = cfg
        self.split = _json(data, "split.json")
        self.train = {label: _json(folder, "train_summary.json") for label, folder in trains.items()}
        self.score = {label: _json(folder, "score_summary.json") for label, folder in scores.items()}
        self.bon = _json(rewards, "logged_bon.json")
        self.rm = _json(rewards, "rm_eval.json")
        self.values = _json(rewards, "per_instruction.json")
        self.ppo_run = {label: _json(folder, "ppo_summary.json") for label, folder in ppo_runs.items()}
        self.ppo = {label: _json(folder, "ppo_eval.json") for label, folder in ppo_evals.items()}
        self.singles = [arm.label for arm in cfg.arms if not arm.is_ensemble]
        self.ensembles = [arm for arm in cfg.arms if arm.is_ensemble]
        self.judges = list(self.bon["judges"])
        for judge in self.judges:  # the paper's baseline: the single models' per-instruction average
            if self.singles:
                self.values[judge][SINGLE] = _average([self.values[judge][f"{s}/mean"] for s in self.singles])
            for rule in cfg.rules if self.ensembles else []:  # Coste et al. compare rules over many ensembles
                self.values[judge][f"ensembles/{rule.name}"] = _average(
                    [self.values[judge][f"{arm.label}/{rule.name}"] for arm in self.ensembles])

    def win(self, judge: str, series: str, n: int) -> tuple[float, float]:
        values = self.values[judge][series][str(n)]
        mean = sum(values) / len(values)
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) \
            if len(values) > 1 else math.nan
        return mean, se

    def compare(self, judge: str, a: str, b: str, n: int, expected: str, claim: str, source: str) -> dict:
        diff, se = paired(self.values[judge][a][str(n)], self.values[judge][b][str(n)])
        return {"source": source, "claim": claim, "setting": f"Best-of-n, {judge}, n={n}", "judge": judge, "n": n,
                "a": a, "b": b,
                "a_value": self.win(judge, a, n)[0], "b_value": self.win(judge, b, n)[0], "diff": diff, "se": se,
                "verdict": verdict(diff, se, expected)}


def bon_claims(r: Results, n_small: int = 4) -> list[dict]:
    """Zhang et al. (ensembles beat one reward model; LoRA is the best ensemble; efficient ensembles match
    full ones) and Coste et al. (conservative rules beat the mean as optimisation grows; each rule against
    the mean, averaged over the ensembles), at the largest n and at n = `n_small`."""
    lora = [a.label for a in r.ensembles if a.kind == "lora"]
    linear = [a.label for a in r.ensembles if a.kind == "linear"]
    full = [a.label for a in r.ensembles if a.kind == "full"]
    zhang, ahmed, coste = "Zhang et al. 2024", "Zhang et al. 2024; Ahmed et al. 2024", "Coste et al. 2023"
    tests = [(f"{arm.label}/mean", SINGLE, "higher", "an ensemble (mean) picks better outputs than a single reward "
              "model", zhang) for arm in (r.ensembles if r.singles else [])]
    tests += [(f"{a}/mean", f"{b}/mean", "higher", "the LoRA ensemble is the best ensemble", zhang)
              for a in lora for b in linear]
    tests += [(f"{a}/mean", f"{b}/mean", "similar", "an efficient ensemble matches the full ensemble", ahmed)
              for a in linear + lora for b in full]
    tests += [(f"ensembles/{rule.name}", "ensembles/mean", "higher", "a conservative rule beats the mean as n grows "
               "(less overoptimisation)", coste) for rule in r.cfg.rules if rule.rule in CONSERVATIVE and r.ensembles]
    claims = []
    for judge in r.judges:
        ns = r.bon["judges"][judge]["ns"]
        for n in sorted({min(n_small, ns[-1]), ns[-1]}):
            claims += [r.compare(judge, a, b, n, expected, text, source) for a, b, expected, text, source in tests]
    return claims


def ppo_claims(r: Results) -> list[dict]:
    """Final gold-judged win rates of PPO policies: ensemble vs single, conservative rule vs mean."""
    claims = []
    finals = {label: result["points"][-1] for label, result in r.ppo.items()}
    for judge in r.judges:
        key = f"gold_values_{judge}"
        singles = [label for label in finals if label.split("/")[0] in r.singles]
        for label, point in finals.items():
            arm, rule = label.split("/")
            if arm in r.singles:
                continue
            pairs = [(s, "ensemble PPO beats single-model PPO under the gold judge", "higher", "Zhang et al. 2024")
                     for s in singles]
            if rule != "mean" and f"{arm}/mean" in finals:
                pairs.append((f"{arm}/mean", "a conservative rule beats the mean in PPO under the gold judge",
                              "higher", "Coste et al. 2023"))
            for other, claim, expected, source in pairs:
                diff, se = paired(point[key], finals[other][key])
                claims.append({"source": source, "claim": claim, "setting": f"PPO, gold judge vs {judge} references",
                               "a": label, "b": other, "a_value": point[f"gold_win_rate_{judge}"],
                               "b_value": finals[other][f"gold_win_rate_{judge}"], "diff": diff, "se": se,
                               "verdict": verdict(diff, se, expected)})
    return claims


def overoptimisation(r: Results, judge: str) -> dict[str, dict]:
    """Per series: the n with the highest win rate and how far the win rate falls from there to the largest n."""
    out = {}
    entry = r.bon["judges"][judge]
    for group in ("baselines", "gold", "arms"):
        for name, rows in entry[group].items():
            peak = max(rows, key=lambda row: row["win_rate"])
            out[name] = {"peak_n": peak["n"], "peak": peak["win_rate"], "at_max_n": rows[-1]["win_rate"],
                         "drop": peak["win_rate"] - rows[-1]["win_rate"]}
    return out


def _arm_rows(r: Results) -> list[list]:
    rows = []
    for label in ["gold"] + [arm.label for arm in r.cfg.arms]:
        train, score = r.train[label], r.score[label]
        row = [label, train["pairs"], train["steps"], train["param_mib"], train["train_wall_s"],
               train["train_peak_over_start_mib"], score["score_wall_s"], score["responses_per_s"]]
        for judge in r.judges:
            m = r.rm[judge][label]
            row += [m["accuracy"], m["accuracy_longer_lost"], m["ece"]]
        rows.append(row)
    length = [r.rm[judge]["gold"] for judge in r.judges]
    rows.append(["the longer output wins", "-", "-", "-", "-", "-", "-", "-"]
                + [v for m in length for v in (m["length_rule_accuracy"], 0.0, None)])
    return rows


def _paper_table(r: Results) -> list[list]:
    """Zhang et al.'s Table 1 in shape: one row per reward model, Best-of-n and PPO outcomes."""
    rows = []
    groups = ([(SINGLE, None)] if r.singles else []) + [(arm.label, arm) for arm in r.ensembles]
    for name, arm in groups:
        row = [name]
        for judge in r.judges:
            n_max = r.bon["judges"][judge]["ns"][-1]
            series = name if arm is None else f"{name}/mean"
            row.append(_pm(*r.win(judge, series, n_max)))
            if arm is not None:
                best = max((f"{name}/{rule.name}" for rule in arm.rules(r.cfg.rules)),
                           key=lambda s: r.win(judge, s, n_max)[0])
                row.append(f"{_pm(*r.win(judge, best, n_max))} ({best.split('/')[1]})")
            else:
                row.append("-")
        result = r.ppo.get(f"{r.singles[0] if arm is None else name}/mean")
        for judge in r.judges:
            point = result["points"][-1] if result else None
            row.append(_pm(point[f"gold_win_rate_{judge}"], point[f"gold_win_rate_{judge}_se"]) if point else "-")
        rows.append(row)
    return rows


def report_step(folder: Path, *, experiment: ExperimentConfig, data: Path, trains: dict[str, Path],
                scores: dict[str, Path], rewards: Path, ppo_runs: dict[str, Path], ppo_evals: dict[str, Path],
                part: str) -> dict:
    r = Results(experiment, data, trains, scores, rewards, ppo_runs, ppo_evals)
    claims = bon_claims(r) + ppo_claims(r)
    results = {"size": experiment.size, "part": part, "split": r.split, "train": r.train, "score": r.score,
               "reward_models": r.rm, "logged_bon": r.bon, "overoptimisation": {j: overoptimisation(r, j)
                                                                                 for j in r.judges},
               "ppo": {label: {**r.ppo_run[label], **res["summary"], "points": res["points"]}
                       for label, res in r.ppo.items()},
               "claims": claims}
    for name in ("logged_bon.json", "logged_bon.csv", *(f"logged_bon_{j}.png" for j in r.judges), "rm_eval.json"):
        shutil.copy2(Path(rewards) / name, folder / name)
    if r.ppo:
        curves = {}
        for label, res in r.ppo.items():
            for key, curve in curve_from_points(res["points"], ["gold", "proxy"]).items():
                curves[f"{label} {key}"] = curve
        save_curves(curves, "rl", folder / "ppo_curves", "PPO: gold and proxy reward against sqrt(KL)")
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2))
    atomic_write_text(folder / "report.md", "\n".join(markdown(r, claims, part)))
    agree = sum(c["verdict"].startswith("agrees") for c in claims)
    return {"claims": len(claims), "claims_agreeing": agree, "ppo_runs": len(r.ppo)}


def markdown(r: Results, claims: list[dict], part: str) -> list[str]:
    s = r.split
    lines = [f"# rmens reference experiment: size `{r.cfg.size}`", "",
             f"Evaluation pools from `{s['eval_source']}`: {s['evaluation_instructions']} held-out instructions "
             f"(never trained on; {s['evaluation_instructions_in_training']} found in any training set), "
             + ", ".join(f"{j.upper()} {s[f'pools_{j}']} pools / {s[f'pool_outputs_{j}']} outputs" for j in r.judges)
             + f". Training verdicts from `{s['train_source']}`: gold judge {s['gold_pairs']} pairs "
             f"({s['gold_instructions']} instructions), proxies {s['proxy_pairs']} pairs "
             f"({s['proxy_instructions']} other instructions). Backbone `{r.cfg.ensemble.backbone}` at "
             f"{r.cfg.ensemble.max_length} tokens (gold: {r.cfg.gold.ensemble.max_length}).", ""]
    lines += ["## The paper's table (Zhang et al. 2024, Table 1 in shape)", "",
              "Best-of-n: AlpacaEval win rate against the reference at the largest n, judged by the real judge's "
              "logged verdicts; PPO: final policy's win rate against the references under the gold judge. "
              "± is the standard error over instructions.", ""]
    header = ["reward model"]
    for judge in r.judges:
        n_max = r.bon["judges"][judge]["ns"][-1]
        header += [f"BoN {judge.upper()} n={n_max}, mean", f"BoN {judge.upper()}, best rule"]
    header += [f"PPO (mean rule), gold vs {judge.upper()} ref" for judge in r.judges]
    lines += md_table(header, _paper_table(r))
    lines += ["## What agrees with the papers and what does not", "",
              "Paired over instructions; a difference of at least two standard errors counts. Best-of-n at the "
              "largest n here (results.json also holds n=4). `ensembles/<rule>` averages a rule over every "
              "ensemble arm.", ""]
    shown = at_largest_n(claims, r.bon)
    lines += md_table(["source", "claim", "setting", "a", "b", "a", "b", "a - b ± s.e.", "verdict"],
                      [[c["source"], c["claim"], c["setting"], c["a"], c["b"], c["a_value"], c["b_value"],
                        _pm(c["diff"], c["se"]), c["verdict"]] for c in shown])
    lines += ["## Reward models: cost and held-out agreement with the judge", "",
              "Accuracy on decided held-out verdicts (output against reference), overall and where the longer "
              "output lost; the last row is the length rule on the same pairs. Training peak memory: "
              + ("PyTorch's peak allocated GPU memory." if r.train["gold"]["memory"] == "cuda" else
                 "the process's peak resident memory above its level when the arm's training started."), ""]
    header = ["arm", "pairs", "steps", "params MiB", "train s", "train peak MiB", "score s", "responses/s"]
    for judge in r.judges:
        header += [f"{judge} acc", f"{judge} acc longer lost", f"{judge} ECE"]
    lines += md_table(header, _arm_rows(r))
    for judge in r.judges:
        entry = r.bon["judges"][judge]
        lines += [f"## Best-of-n over logged outputs: {entry['judge_name']}", "",
                  f"{entry['n_instructions']} instructions, pools of {entry['pool_sizes']} outputs. Win rate ± s.e. "
                  f"(mean length of the picked output, characters). Curves: logged_bon_{judge}.png.", ""]
        ns = entry["ns"]
        rows = []
        for group in ("baselines", "gold", "arms"):
            for name, series in entry[group].items():
                rows.append([name] + [f"{row['win_rate']:.3f} ± {row['se']:.3f} ({row['mean_length']:.0f})"
                                      for row in series])
        lines += md_table(["series"] + [f"n={n}" for n in ns], rows)
    if r.ppo:
        lines += ["## PPO judged by the gold reward model", "",
                  "Answers of the initial and final policy to held-out instructions; win rate against each judge "
                  "set's reference output under the gold judge (sigmoid of the reward difference). Curves of gold "
                  "and proxy reward against sqrt(KL): ppo_curves/curves.png.", ""]
        header = ["PPO arm", "steps", "final KL", "proxy gain", "gold gain", "chars initial -> final"]
        header += [f"gold win vs {j} ref, initial -> final" for j in r.judges] + ["PPO s"]
        rows = []
        for label, res in r.ppo.items():
            sm = res["summary"]
            row = [label, sm["final_step"], sm["final_kl"], sm["proxy_gain"], sm["gold_gain"],
                   f"{sm['initial_response_chars']:.0f} -> {sm['final_response_chars']:.0f}"]
            row += [f"{_pm(sm[f'initial_gold_win_rate_{j}'], sm[f'initial_gold_win_rate_{j}_se'])} -> "
                    f"{_pm(sm[f'final_gold_win_rate_{j}'], sm[f'final_gold_win_rate_{j}_se'])}" for j in r.judges]
            rows.append(row + [r.ppo_run[label]["ppo_wall_s"]])
        lines += md_table(header, rows)
    elif part != "all":
        lines += ["PPO: not run in this part (`--part rewards`).", ""]
    return lines
