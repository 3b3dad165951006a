"""The experiment's verdicts, computed so that a reviewer who checks the design finds nothing that makes
one mean something else.

- Training runs are random: every arm is trained several times, and each comparison uses the per-run,
  per-pool values with rmens.evaluation.stats.compare (runs random, pools paired). A single run gives no
  verdict.
- One primary comparison is named in the config before the results exist and is reported first, at the
  significance level alone. Every other verdict belongs to a family (the papers' claims; the design's
  checks), and its p-value is corrected with Holm's method over that family (`p_holm`).
- Every verdict carries its minimum detectable difference (80% power by default) at the significance level
  it was judged at (alpha / m, the strictest Holm step, for a family of m), so that "no significant
  difference" says how large a difference could have hidden.
- PPO arms are compared at matched KL along their gold-versus-KL curves, and only after the gold judge is
  shown to agree with the held-out verdicts better than every proxy by the configured margin.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmens.arms import Arm
from rmens.evaluation.logged_bon import evaluation_sets
from rmens.evaluation.stats import compare, holm, minimum_detectable_difference, runs_needed, verdict
from rmens.experiment.config import ExperimentConfig

ZHANG, AHMED, COSTE = "Zhang et al. 2024", "Zhang et al. 2024; Ahmed et al. 2024", "Coste et al. 2023"
CONSERVATIVE = ("min", "lcb", "uwo")
SINGLE = "single"


@dataclass
class Evidence:
    """What the rewards step measured: per-run, per-pool values of every series by evaluation set and n
    (per_instruction.json), agreement by set and model (rm_eval.json), and the Best-of-n curves."""

    values: dict  # set -> "<group>:<series>" -> n -> [runs][pools]
    agreement: dict  # set -> label (gold, <arm>-r<i>, twin:<arm>-r<i>) -> metrics with per_pool accuracy
    bon: dict  # logged_bon.json

    @classmethod
    def read(cls, rewards: Path) -> Evidence:
        def load(name):
            return json.loads((Path(rewards) / name).read_text())

        return cls(load("per_instruction.json"), load("rm_eval.json"), load("logged_bon.json"))

    def sets(self) -> dict[str, dict]:
        return evaluation_sets(self.bon)

    def largest_n(self, name: str) -> int:
        return self.sets()[name]["ns"][-1]

    def matrix(self, name: str, series: str, n: int) -> np.ndarray:
        """[runs, pools] values of a series ("arms:linear-k5/mean", "twins:...", "baselines:random")."""
        return np.array(self.values[name][series][str(n)], dtype=np.float64)

    def pooled(self, name: str, arms: list[Arm], rule: str, n: int, group: str = "arms") -> np.ndarray:
        """Every run of every listed arm under one rule, stacked: [sum of runs, pools] (row order fixed, so
        that two rules' stacks are paired run by run)."""
        return np.concatenate([self.matrix(name, f"{group}:{arm.label}/{rule}", n) for arm in arms])

    def accuracy(self, name: str, labels: list[str]) -> np.ndarray:
        """[models, pools] per-pool held-out accuracy of the labelled models, pools with a decided pair only."""
        matrix = np.array([self.agreement[name][label]["per_pool"] for label in labels], dtype=np.float64)
        return matrix[:, ~np.isnan(matrix).any(axis=0)]


def claim_for(x: np.ndarray, y: np.ndarray, /, *, paired_runs: bool = False, a_fixed: bool = False,
               b_fixed: bool = False, **fields) -> dict:
    """One claim, series `x` (a) against `y` (b): its fields (names a and b among them), the test (runs
    random) and its means."""
    c = compare(x, y, paired_runs=paired_runs, a_fixed=a_fixed, b_fixed=b_fixed)
    return {**fields, "a_value": float(x.mean()), "b_value": float(y.mean()), "diff": c.diff, "se": c.se,
            "df": c.df, "p": c.p, "runs_a": c.runs_a, "runs_b": c.runs_b, "pools": c.n_instructions,
            "paired_runs": paired_runs, "undetermined": c.undetermined, "components": c.components}


def finish(claims: list[dict], alpha: float, power: float) -> list[dict]:
    """Holm over the family `claims`; each claim's verdict and minimum detectable difference at the strictest
    Holm level (alpha / m, m the claims with a p-value)."""
    m = max(1, sum(not math.isnan(c["p"]) for c in claims))
    for claim, p_holm in zip(claims, holm([c["p"] for c in claims])):
        claim["p_holm"] = p_holm
        claim["verdict"] = verdict(claim, p_holm, claim["expected"], alpha)
        claim["mdd"] = minimum_detectable_difference(claim["se"], claim["df"], alpha / m, power)
    return claims


def primary(cfg: ExperimentConfig, ev: Evidence) -> dict:
    """The comparison named in advance, tested alone at alpha, with what it would take to detect 0.03."""
    spec = cfg.primary
    n = spec.n or ev.largest_n(spec.judge)
    a, b = ev.matrix(spec.judge, f"arms:{spec.a}", n), ev.matrix(spec.judge, f"arms:{spec.b}", n)
    claim = claim_for(a, b, family="primary", source="named in the config", claim=spec.label,
                       setting=f"Best-of-n, {spec.judge}, n={n}", set=spec.judge, n=n, a=spec.a, b=spec.b,
                       expected="higher")
    finish([claim], cfg.alpha, cfg.power)  # a family of one: p_holm = p
    claim["plan"] = power_plan(claim, cfg.alpha, cfg.power)
    return claim


def power_plan(claim: dict, alpha: float, power: float, target: float = 0.03) -> dict:
    """The variance parts of a comparison as standard deviations, and the runs per arm that would detect
    `target` at this many pools and at twice and four times as many (None: the pools' part alone is too big)."""
    parts, runs_a, runs_b, pools = claim["components"], claim["runs_a"], claim["runs_b"], claim["pools"]
    sd = {"run_sd_a": math.sqrt(parts.get("runs_a", math.nan) * runs_a),
          "run_sd_b": math.sqrt(parts.get("runs_b", math.nan) * runs_b),
          "pool_sd": math.sqrt(parts.get("instructions", math.nan) * pools)}
    if any(math.isnan(v) for v in sd.values()):
        return {**sd, "target": target, "runs_needed": None}
    needed = {str(k * pools): runs_needed(target, sd["run_sd_a"], sd["run_sd_b"], sd["pool_sd"], k * pools, alpha,
                                          power) for k in (1, 2, 4)}
    return {**sd, "target": target, "runs_needed": needed}


def bon_claims(cfg: ExperimentConfig, ev: Evidence, sets: list[str], family: str) -> list[dict]:
    """The papers' Best-of-n claims at the largest n of each of `sets`, as one family. Zhang et al.: an
    ensemble (mean) beats a single reward model, the LoRA ensemble beats the other ensembles; Ahmed et al.:
    an efficient ensemble matches the full one; Coste et al.: a conservative rule beats the mean (every
    ensemble's runs stacked, paired run by run: the same models under two rules; stacking the arms counts
    their differences as run variance, which makes the test conservative). The primary comparison is not
    repeated here: it is tested alone."""
    ensembles = [arm for arm in cfg.arms if arm.is_ensemble]
    lora = [a.label for a in ensembles if a.kind == "lora"]
    single = any(arm.label == SINGLE for arm in cfg.arms)
    tests = [(f"{arm.label}/mean", f"{SINGLE}/mean", "higher", "an ensemble (mean) picks better outputs than a "
              "single reward model", ZHANG) for arm in (ensembles if single else [])]
    tests += [(f"{a}/mean", f"{b.label}/mean", "higher", "the LoRA ensemble beats the other ensembles", ZHANG)
              for a in lora for b in ensembles if b.kind in ("linear", "full")]
    tests += [(f"{a.label}/mean", f"{b.label}/mean", "similar", "an efficient ensemble matches the full ensemble",
               AHMED) for a in ensembles if a.kind != "full" for b in ensembles if b.kind == "full"
              if (f"{a.label}/mean", f"{b.label}/mean") not in {(x, y) for x, y, *_ in tests}]  # LoRA's is tested
    claims, spec = [], cfg.primary
    for name in sets:
        n = ev.largest_n(name)
        setting = dict(family=family, setting=f"Best-of-n, {name}, n={n}", set=name, n=n)
        for a, b, expected, text, source in tests:
            if (name, n, a, b) == (spec.judge, spec.n or ev.largest_n(spec.judge), spec.a, spec.b):
                continue
            claims.append(claim_for(ev.matrix(name, f"arms:{a}", n), ev.matrix(name, f"arms:{b}", n), a=a, b=b,
                                     expected=expected, claim=text, source=source, **setting))
        for rule in [r for r in cfg.rules if r.rule in CONSERVATIVE] if ensembles else []:
            claims.append(claim_for(ev.pooled(name, ensembles, rule.name, n), ev.pooled(name, ensembles, "mean", n),
                                     paired_runs=True, a=f"ensembles/{rule.name}", b="ensembles/mean",
                                     expected="higher", claim="a conservative rule beats the mean under the "
                                     "strongest optimisation", source=COSTE, **setting))
    return claims


def design_checks(cfg: ExperimentConfig, ev: Evidence) -> list[dict]:
    """What the design must show before any claim means anything: every arm beats its untrained twin (held-
    out agreement per pool; Best-of-n at the largest n), paired run by run (same seeds)."""
    checks = []
    for name in ev.sets():
        n = ev.largest_n(name)
        for arm in cfg.arms:
            labels = [arm.run_label(r) for r in range(cfg.runs_of(arm))]
            acc = ev.accuracy(name, labels + [f"twin:{label}" for label in labels])
            checks.append(claim_for(acc[:len(labels)], acc[len(labels):], paired_runs=True, family="checks",
                                     claim="the trained arm agrees with the judge more than its untrained twin",
                                     source="design", setting=f"held-out agreement, {name}", set=name, n=None,
                                     a=arm.label, b=f"{arm.label} untrained", expected="higher"))
            rule = arm.rules(cfg.rules)[0].name
            checks.append(claim_for(ev.matrix(name, f"arms:{arm.label}/{rule}", n),
                                     ev.matrix(name, f"twins:{arm.label}/{rule}", n), paired_runs=True,
                                     family="checks", claim="the trained arm picks better than its untrained twin",
                                     source="design", setting=f"Best-of-n, {name}, n={n}", set=name, n=n,
                                     a=f"{arm.label}/{rule}", b=f"{arm.label}/{rule} untrained", expected="higher"))
    return checks


def recognition(ev: Evidence) -> list[dict]:
    """Per evaluation set, system_prior against random at the largest n (both deterministic; pools paired):
    when the prior beats random by more than two standard errors, the pools still reward recognising systems."""
    out = []
    for name in ev.sets():
        n = ev.largest_n(name)
        c = claim_for(ev.matrix(name, "baselines:system_prior", n), ev.matrix(name, "baselines:random", n),
                       a_fixed=True, b_fixed=True, set=name, n=n, a="system_prior", b="random")
        c["recognition"] = bool(c["se"] > 0 and c["diff"] > 2 * c["se"])
        out.append(c)
    return out


# -- PPO --------------------------------------------------------------------------------------------

def gold_check(cfg: ExperimentConfig, ev: Evidence) -> tuple[bool, list[dict]]:
    """Whether the gold judge agrees with the held-out verdicts better than every proxy arm, on every
    AlpacaEval judge set: by at least gold.min_margin of accuracy, and with the one-sided (1 - alpha) lower
    bound of the difference above 0 (per-pool accuracies paired; the arm's runs random, the gold model one
    fixed model). PPO is judged by the gold model, so a gold model no better than the proxies makes every
    PPO verdict meaningless."""
    from scipy import stats as scipy_stats

    rows = []
    for name in ev.bon["judges"]:
        for arm in cfg.arms:
            labels = [arm.run_label(r) for r in range(cfg.runs_of(arm))]
            acc = ev.accuracy(name, ["gold", *labels])
            c = claim_for(acc[:1], acc[1:], a_fixed=True, set=name, a="gold", b=arm.label)
            lower = (c["diff"] - scipy_stats.t(c["df"]).ppf(1 - cfg.alpha) * c["se"] if c["se"] and c["se"] > 0
                     else math.nan)
            rows.append({"set": name, "arm": arm.label, "gold": c["a_value"], "proxy": c["b_value"],
                         "margin": c["diff"], "se": c["se"], "lower_bound": lower,
                         "ok": bool(c["diff"] >= cfg.gold.min_margin and lower > 0)})
    return all(row["ok"] for row in rows), rows


def value_at_kl(points: list[dict], key: str, kl: float) -> np.ndarray:
    """Per prompt, a PPO run's `key` values at KL `kl`, linearly interpolated between the two checkpoints
    around the first point where the run's KL reaches it (KL is estimated, so it need not be monotone)."""
    kls = [p["kl"] for p in points]
    if kl <= kls[0]:
        return np.asarray(points[0][key], dtype=np.float64)
    for before, after in zip(points, points[1:]):
        if after["kl"] >= kl:
            w = (kl - before["kl"]) / (after["kl"] - before["kl"]) if after["kl"] > before["kl"] else 1.0
            return (1 - w) * np.asarray(before[key], dtype=np.float64) + w * np.asarray(after[key], dtype=np.float64)
    raise ValueError(f"the run never reaches KL {kl:.3f} (largest {max(kls):.3f})")


def matched_kl(runs: list[list[dict]]) -> float:
    """The largest KL that every run reached: where all of them can be compared."""
    return max(0.0, min(max(p["kl"] for p in points) for points in runs))


def ppo_claims(cfg: ExperimentConfig, points: dict[str, list[list[dict]]]) -> list[dict]:
    """PPO arms compared at matched KL under the gold judge (win rate against each judge set's references):
    an ensemble under the mean against the single model, and a conservative rule against the mean of the
    same ensemble (paired run by run: run r of both uses the reward model of run r). `points` maps each PPO
    arm's label to its runs' evaluation points."""
    tests = []
    for ppo_arm in cfg.ppo_arms:
        if ppo_arm.label not in points or not cfg.arm(ppo_arm.arm).is_ensemble:
            continue
        mean_label = f"{ppo_arm.arm}/mean"
        if ppo_arm.rule.rule == "mean" and f"{SINGLE}/mean" in points:
            tests.append((ppo_arm.label, f"{SINGLE}/mean", False, "ensemble PPO (mean) beats single-model PPO", ZHANG))
        if ppo_arm.rule.rule in CONSERVATIVE and mean_label in points:
            tests.append((ppo_arm.label, mean_label, True, "a conservative rule beats the mean in PPO", COSTE))
    claims = []
    for judge in cfg.pools.judges:
        key = f"gold_values_{judge}"
        for a, b, paired, text, source in tests:
            kl = matched_kl(points[a] + points[b])
            claims.append(claim_for(np.stack([value_at_kl(run, key, kl) for run in points[a]]),
                                     np.stack([value_at_kl(run, key, kl) for run in points[b]]), paired_runs=paired,
                                     family="claims", claim=text, source=source, expected="higher", set=judge, n=None,
                                     setting=f"PPO at matched KL {kl:.2f}, gold judge vs {judge} references",
                                     a=a, b=b, kl=kl))
    return claims
