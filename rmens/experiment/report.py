"""The experiment's report, generated from its results (never typed by hand): results.json, report.md
with tables in the shape of Zhang et al.'s and Coste et al.'s, and, for each of their claims, what these
results say about it with a paired standard error over instructions.

A difference counts as evidence when it is at least twice its standard error; otherwise the report
says the results show no significant difference (which is not evidence of equality). Standard errors
are over instructions only (the seeds of the single models are averaged first), so they understate the
spread across training runs; many claims are tested at once, so a few "significant" verdicts can be
chance.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from rmens.evaluation.curves import curve_from_points, save_curves
from rmens.evaluation.logged_bon import standard_error
from rmens.experiment.config import ArmSpec, ExperimentConfig
from rmens.io import atomic_write_text, write_json

SINGLE = "single (mean of seeds)"
CONSERVATIVE = ("min", "lcb", "uwo")
CAVEAT = ("Standard errors are over instructions only (single-model seeds are averaged first), so they understate "
          "the spread across training runs; many claims are tested at once, so a few verdicts at two standard errors "
          "can be chance. \"No significant difference\" is not evidence of equality.")


def _json(folder: Path, name: str):
    return json.loads((Path(folder) / name).read_text())


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over instructions; the standard error of one instruction is undefined."""
    tensor = torch.tensor(values, dtype=torch.float64)
    return float(tensor.mean()), standard_error(tensor) if len(values) > 1 else math.nan


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over instructions and its standard error."""
    return mean_se([x - y for x, y in zip(a, b, strict=True)])


def verdict(diff: float, se: float, expected: str) -> str:
    """expected: 'higher' (the claim is that a beats b) or 'similar' (a matches b)."""
    if not math.isfinite(se):
        return "undetermined (one instruction)"
    z = diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0
    if expected == "similar":
        if abs(z) < 2:
            return "no significant difference (not an equivalence test)"
        return "better here" if z > 0 else "disagrees (significantly worse)"
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


def _average(series: list[list[float]]) -> list[float]:
    """Per instruction, the average of several series."""
    return [sum(v) / len(v) for v in zip(*series, strict=True)]


class Results:
    """Everything the steps wrote, in one place, with the single seeds and the ensembles' rules averaged."""

    def __init__(self, cfg: ExperimentConfig, pairs: Path, pools: Path, trains: dict[str, Path],
                 scores: dict[str, Path], rewards: Path, ppo_runs: dict[str, Path], ppo_evals: dict[str, Path]):
        self.cfg = cfg
        self.split = _json(pairs, "split.json")
        self.pools = _json(pools, "pools.json")
        self.train = {label: _json(folder, "train_summary.json") for label, folder in trains.items()}
        self.score = {label: _json(folder, "score_summary.json") for label, folder in scores.items()}
        self.bon = _json(rewards, "logged_bon.json")
        self.rm = _json(rewards, "rm_eval.json")
        self.values = _json(rewards, "per_instruction.json")  # judge -> series -> n -> per-instruction verdicts
        self.ppo_run = {label: _json(folder, "ppo_summary.json") for label, folder in ppo_runs.items()}
        self.ppo = {label: _json(folder, "ppo_eval.json") for label, folder in ppo_evals.items()}
        self.singles = [arm.label for arm in cfg.arms if not arm.is_ensemble]
        self.ensembles = [arm for arm in cfg.arms if arm.is_ensemble]
        self.judges = list(self.bon["judges"])
        for judge, values in self.values.items():
            for n in self.bon["judges"][judge]["ns"]:
                if self.singles:  # the paper's baseline: the single models' per-instruction average
                    values.setdefault(SINGLE, {})[str(n)] = _average([values[f"{s}/mean"][str(n)]
                                                                      for s in self.singles])
                for rule in cfg.rules if self.ensembles else []:  # a rule over every ensemble (Coste et al.)
                    values.setdefault(f"ensembles/{rule.name}", {})[str(n)] = _average(
                        [values[f"{arm.label}/{rule.name}"][str(n)] for arm in self.ensembles])
        self.ppo_final = {label: res["points"][-1] for label, res in self.ppo.items()}
        single_runs = [p.label for p in cfg.ppo_arms if p.label in self.ppo and p.arm in self.singles]
        if single_runs:  # PPO against each single model, averaged per instruction like Best-of-n's baseline
            self.ppo_final[SINGLE] = {key: _average([self.ppo_final[label][key] for label in single_runs])
                                      for key in self.ppo_final[single_runs[0]] if key.startswith("gold_values_")}

    def win(self, judge: str, series: str, n: int) -> tuple[float, float]:
        return mean_se(self.values[judge][series][str(n)])

    def compare(self, judge: str, a: str, b: str, n: int, expected: str, claim: str, source: str) -> dict:
        diff, se = paired(self.values[judge][a][str(n)], self.values[judge][b][str(n)])
        return {"source": source, "claim": claim, "setting": f"Best-of-n, {judge}, n={n}", "judge": judge, "n": n,
                "a": a, "b": b, "a_value": self.win(judge, a, n)[0], "b_value": self.win(judge, b, n)[0],
                "diff": diff, "se": se, "verdict": verdict(diff, se, expected)}

    def ppo_win(self, label: str, judge: str) -> tuple[float, float]:
        return mean_se(self.ppo_final[label][f"gold_values_{judge}"])


ZHANG, AHMED, COSTE = "Zhang et al. 2024", "Zhang et al. 2024; Ahmed et al. 2024", "Coste et al. 2023"


def bon_claims(r: Results, n_small: int = 4) -> list[dict]:
    """Zhang et al.: ensembles beat one reward model, the LoRA ensemble is the best, efficient ensembles match
    the full one. Coste et al.: a conservative rule beats the mean when optimisation is strongest (every rule
    picks alike at n = 1, so the difference at the largest n is what the rule adds as n grows), each rule
    against the mean averaged over the ensembles. At the largest n and at n = `n_small`."""
    lora = [a.label for a in r.ensembles if a.kind == "lora"]
    others = [a.label for a in r.ensembles if a.kind in ("linear", "full")]
    full = [a.label for a in r.ensembles if a.kind == "full"]
    tests = [(f"{arm.label}/mean", SINGLE, "higher", "an ensemble (mean) picks better outputs than a single reward "
              "model", ZHANG) for arm in (r.ensembles if r.singles else [])]
    tests += [(f"{a}/mean", f"{b}/mean", "higher", "the LoRA ensemble beats the other ensembles", ZHANG)
              for a in lora for b in others]
    tests += [(f"{a}/mean", f"{b}/mean", "similar", "an efficient ensemble matches the full ensemble", AHMED)
              for a in [x.label for x in r.ensembles if x.kind != "full"] for b in full]
    tests += [(f"ensembles/{rule.name}", "ensembles/mean", "higher", "a conservative rule beats the mean under the "
               "strongest optimisation", COSTE) for rule in r.cfg.rules if rule.rule in CONSERVATIVE and r.ensembles]
    claims = []
    for judge in r.judges:
        ns = r.bon["judges"][judge]["ns"]
        for n in sorted({min(n_small, ns[-1]), ns[-1]}):
            claims += [r.compare(judge, a, b, n, expected, text, source) for a, b, expected, text, source in tests]
    return claims


def ppo_claims(r: Results) -> list[dict]:
    """Final policies judged by the gold model: an ensemble under the mean against the single models (seeds
    averaged per instruction), and a conservative rule against the mean of the same ensemble."""
    tests = []
    for ppo_arm in r.cfg.ppo_arms:
        if ppo_arm.label not in r.ppo or not r.cfg.arm(ppo_arm.arm).is_ensemble:
            continue
        mean_label = f"{ppo_arm.arm}/mean"
        if ppo_arm.rule.rule == "mean" and SINGLE in r.ppo_final:
            tests.append((ppo_arm.label, SINGLE, "ensemble PPO (mean) beats single-model PPO", ZHANG))
        if ppo_arm.rule.rule in CONSERVATIVE and mean_label in r.ppo:
            tests.append((ppo_arm.label, mean_label, "a conservative rule beats the mean in PPO", COSTE))
    claims = []
    for judge in r.judges:
        for a, b, text, source in tests:
            diff, se = paired(r.ppo_final[a][f"gold_values_{judge}"], r.ppo_final[b][f"gold_values_{judge}"])
            claims.append({"source": source, "claim": text, "setting": f"PPO, gold judge vs {judge} references",
                           "a": a, "b": b, "a_value": r.ppo_win(a, judge)[0], "b_value": r.ppo_win(b, judge)[0],
                           "diff": diff, "se": se, "verdict": verdict(diff, se, "higher")})
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


def _best_rule(r: Results, arm: ArmSpec, judge: str, n: int) -> tuple[str, float, float]:
    return max(((rule.name, *r.win(judge, f"{arm.label}/{rule.name}", n)) for rule in arm.rules(r.cfg.rules)),
               key=lambda named: named[1])


def _paper_table(r: Results) -> list[list]:
    """Zhang et al.'s Table 1 in shape: one row per reward model, Best-of-n and PPO outcomes."""
    rows = []
    groups = ([(SINGLE, None)] if r.singles else []) + [(arm.label, arm) for arm in r.ensembles]
    for name, arm in groups:
        row = [name]
        for judge in r.judges:
            n_max = r.bon["judges"][judge]["ns"][-1]
            row.append(_pm(*r.win(judge, name if arm is None else f"{name}/mean", n_max)))
            if arm is None:
                row.append("-")
            else:
                rule, value, se = _best_rule(r, arm, judge, n_max)
                row.append(f"{_pm(value, se)} ({rule})")
        ppo = SINGLE if arm is None else f"{name}/mean"
        row += [_pm(*r.ppo_win(ppo, judge)) if ppo in r.ppo_final else "-" for judge in r.judges]
        rows.append(row)
    return rows


def report_step(folder: Path, *, experiment: ExperimentConfig, pairs: Path, pools: Path, trains: dict[str, Path],
                scores: dict[str, Path], rewards: Path, ppo_runs: dict[str, Path], ppo_evals: dict[str, Path],
                part: str) -> dict:
    r = Results(experiment, pairs, pools, trains, scores, rewards, ppo_runs, ppo_evals)
    claims = bon_claims(r) + ppo_claims(r)
    results = {"size": experiment.size, "part": part, "split": r.split, "pools": r.pools, "train": r.train,
               "score": r.score, "reward_models": r.rm, "logged_bon": r.bon,
               "overoptimisation": {judge: overoptimisation(r, judge) for judge in r.judges},
               "ppo": {label: {**r.ppo_run[label], **res["summary"], "points": res["points"]}
                       for label, res in r.ppo.items()},
               "claims": claims, "caveat": CAVEAT}
    for name in ("logged_bon.json", "logged_bon.csv", *(f"logged_bon_{j}.png" for j in r.judges), "rm_eval.json"):
        shutil.copy2(Path(rewards) / name, folder / name)
    if r.ppo:
        curves = {f"{label} {key}": curve for label, res in r.ppo.items()
                  for key, curve in curve_from_points(res["points"], ["gold", "proxy"]).items()}
        save_curves(curves, "rl", folder / "ppo_curves", "PPO: gold and proxy reward against sqrt(KL)")
    write_json(folder / "results.json", results)
    atomic_write_text(folder / "report.md", "\n".join(markdown(r, claims, part)))
    return {"claims": len(claims), "claims_agreeing": sum(c["verdict"] == "agrees" for c in claims),
            "ppo_runs": len(r.ppo)}


def markdown(r: Results, claims: list[dict], part: str) -> list[str]:
    s, p = r.split, r.pools
    lines = [f"# rmens reference experiment: size `{r.cfg.size}`", "",
             f"Evaluation instructions from `{s['eval_source']}`"
             + (" (held out by a hash of the instruction)" if s["held_out_by_hash"] else "")
             + f": {s['evaluation_instructions']}, none in any training set; pools: "
             + ", ".join(f"{j.upper()} {p[f'pools_{j}']} instructions / {p[f'pool_outputs_{j}']} outputs"
                         for j in r.judges)
             + f". Training verdicts from `{s['train_source']}`: gold judge {s['gold_pairs']} pairs "
             f"({s['gold_instructions']} instructions), proxies {s['proxy_pairs']} pairs "
             f"({s['proxy_instructions']} other instructions). Backbone `{r.cfg.ensemble.backbone}` at "
             f"{r.cfg.ensemble.max_length} tokens (gold judge: {r.cfg.gold.ensemble.max_length}).", ""]
    lines += ["## The paper's table (Zhang et al. 2024, Table 1 in shape)", "",
              "Best-of-n: AlpacaEval win rate against the reference at the largest n, judged by the real judge's "
              "logged verdicts; PPO: the final policy's win rate against the references under the gold judge. "
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
              f"ensemble arm. {CAVEAT}", ""]
    lines += md_table(["source", "claim", "setting", "a", "b", "a win rate", "b win rate", "a - b ± s.e.", "verdict"],
                      [[c["source"], c["claim"], c["setting"], c["a"], c["b"], c["a_value"], c["b_value"],
                        _pm(c["diff"], c["se"]), c["verdict"]] for c in at_largest_n(claims, r.bon)])
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
        rows = [[name] + [f"{row['win_rate']:.3f} ± {row['se']:.3f} ({row['mean_length']:.0f})" for row in series]
                for group in ("baselines", "gold", "arms") for name, series in entry[group].items()]
        lines += md_table(["series"] + [f"n={n}" for n in entry["ns"]], rows)
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
