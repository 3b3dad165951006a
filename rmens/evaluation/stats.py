"""Comparing two arms (reward models) by per-instruction scores, with training runs treated as random.

Each arm is trained several times with different seeds, and a seed alone can move a win rate by more
than a real effect does: a test that pools instructions and ignores runs reads one lucky seed as an
effect. So a comparison takes the matrices ``a`` [R_a, I] and ``b`` [R_b, I] (row = training run,
column = instruction, the same instructions in the same order on both sides) and assumes

    y[arm, run, instr] = mu_arm + u[arm, run] + v[instr] + w[arm, instr] + e

with u (the seed), w (the arm's per-instruction effect) and e random. Pairing the instructions removes
v; the runs are the replication, so a result needs at least two runs per trained side. The variance of
diff = mean(a) - mean(b) is estimated by moments:

    se^2 = var_s(run means of a) / R_a + var_s(run means of b) / R_b + var_i(D_i) / I,
    D_i  = mean_s a[s, i] - mean_s b[s, i]

The run-by-instruction residual e sits in both the run part and the instruction part, so it is counted
twice and se is too large by sigma_e^2 (1/R_a + 1/R_b) / I: conservative, and negligible when I is in
the hundreds. The exact ANOVA estimator subtracts that term but can return a negative variance on few
runs; this one cannot, and each part can be checked by hand. Degrees of freedom are Welch-Satterthwaite
over the three parts, so with few runs the run parts dominate and the test stays honest.

A deterministic side (``*_fixed``: "random pick", "longest output") has no run part. Sides trained
together (``paired_runs``: one ensemble's min rule against its mean rule, a model against its untrained
twin with the same seed) share their seed effect, so their per-run difference is tested instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

AGREES = "agrees"
DISAGREES = "disagrees (significantly worse)"
NOT_REPRODUCED = "not reproduced (no significant difference)"
DIFFERS_BETTER = "differs (a better)"
DIFFERS_WORSE = "differs (a worse)"
NO_DIFFERENCE = "no significant difference (not an equivalence test)"
UNDETERMINED_ONE_RUN = "undetermined (one training run)"
UNDETERMINED_ONE_INSTRUCTION = "undetermined (one instruction)"
UNDETERMINED_NO_VARIATION = "undetermined (no variation)"
UNDETERMINED_NO_SE = "undetermined (no standard error)"  # fields without a reason, e.g. read back from a report
EXPECTED = ("higher", "similar")


@dataclass(frozen=True)
class Comparison:
    """diff = mean(a) - mean(b) with its standard error; components holds the variance parts of se^2.

    Component keys: runs_a, runs_b, instructions (unpaired) or runs, instructions (paired_runs).
    undetermined is the verdict string when no test is possible, else None.
    """

    diff: float
    se: float
    df: float
    t: float
    p: float
    n_instructions: int
    runs_a: int
    runs_b: int
    components: dict[str, float] = field(default_factory=dict)
    paired_runs: bool = False
    undetermined: str | None = None

    def mdd(self, alpha: float = 0.05, power: float = 0.8) -> float:
        """Smallest true difference this comparison detects with the given power."""
        return minimum_detectable_difference(self.se, self.df, alpha, power)


def compare(a, b, *, paired_runs: bool = False, a_fixed: bool = False, b_fixed: bool = False) -> Comparison:
    """Test mean(a) - mean(b) = 0 with training runs random and instructions paired (see the module docstring)."""
    a, b = _matrix("a", a, a_fixed), _matrix("b", b, b_fixed)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"compare: a and b must have the same instructions (columns), got {a.shape} and {b.shape}")
    if paired_runs:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"compare: paired_runs needs the same runs on both sides, got a {a.shape} and b {b.shape}")
        d = a - b
        parts = {"runs": _run_part(d, a_fixed and b_fixed), "instructions": _instruction_part(d.mean(axis=0))}
    else:
        parts = {
            "runs_a": _run_part(a, a_fixed),
            "runs_b": _run_part(b, b_fixed),
            "instructions": _instruction_part(a.mean(axis=0) - b.mean(axis=0)),
        }
    return _result(float(a.mean() - b.mean()), parts, _noise_floor(a, b), a.shape, b.shape, paired_runs)


def _matrix(name: str, x, fixed: bool) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"compare: {name} must be a non-empty 2-D [runs, instructions] array, got shape {x.shape}")
    if fixed and x.shape[0] != 1:
        raise ValueError(f"compare: {name}_fixed means a deterministic side with one row, got shape {x.shape}")
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        run, instr = bad[0]
        raise ValueError(f"compare: {name} has non-finite value {x[run, instr]} at run {run}, instruction {instr}")
    return x


def _run_part(x: np.ndarray, fixed: bool) -> tuple[float, int | None]:
    """(variance, df) of the grand mean due to runs; df None marks a part that is known to be zero."""
    runs = x.shape[0]
    if fixed:
        return 0.0, None
    if runs < 2:
        return math.nan, 0
    return float(np.var(x.mean(axis=1), ddof=1) / runs), runs - 1


def _instruction_part(per_instruction: np.ndarray) -> tuple[float, int]:
    n = len(per_instruction)
    if n < 2:
        return math.nan, 0
    return float(np.var(per_instruction, ddof=1) / n), n - 1


def _noise_floor(a: np.ndarray, b: np.ndarray) -> float:
    # a - b with a = b + c is not exactly c in floating point; a variance from that rounding would give
    # se ~ 1e-18 and an absurd t, so variances below this floor count as zero ("no variation").
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()))
    return (64 * np.finfo(float).eps * scale) ** 2


def _result(diff: float, parts: dict, floor: float, shape_a: tuple, shape_b: tuple, paired: bool) -> Comparison:
    parts = {key: (0.0 if v <= floor else v, dof) for key, (v, dof) in parts.items()}
    variance = sum(v for v, _ in parts.values())
    se = math.sqrt(variance)  # nan when a part is nan
    df = _satterthwaite(variance, parts.values())
    t, p = math.nan, math.nan
    if se > 0:
        from scipy import stats

        t = diff / se
        p = float(2 * stats.t.sf(abs(t), df))
    return Comparison(
        diff=diff,
        se=se,
        df=df,
        t=t,
        p=p,
        n_instructions=shape_a[1],
        runs_a=shape_a[0],
        runs_b=shape_b[0],
        components={key: v for key, (v, _) in parts.items()},
        paired_runs=paired,
        undetermined=_undetermined(parts, se),
    )


def _satterthwaite(variance: float, parts) -> float:
    terms = [v * v / dof for v, dof in parts if dof and v > 0]
    return variance * variance / sum(terms) if terms and not math.isnan(variance) else math.nan


def _undetermined(parts: dict, se: float) -> str | None:
    if math.isnan(parts["instructions"][0]):
        return UNDETERMINED_ONE_INSTRUCTION
    if math.isnan(se):
        return UNDETERMINED_ONE_RUN
    return UNDETERMINED_NO_VARIATION if se == 0 else None


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values in input order; nan stays nan and is not counted in the family."""
    # statsmodels.stats.multitest.multipletests(method="holm") does this, but statsmodels is not a dependency.
    p = np.asarray(p_values, dtype=float)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    adjusted = np.full(p.shape, math.nan)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, (len(order) - rank) * p[index])  # step-down: never below a smaller p's value
        adjusted[index] = min(running, 1.0)
    return [float(x) for x in adjusted]


def minimum_detectable_difference(se: float, df: float | None, alpha: float = 0.05, power: float = 0.8) -> float:
    """(t_{1-alpha/2, df} + t_{power, df}) * se: the two-sided test's detectable difference; df None = normal."""
    if math.isnan(se) or (df is not None and math.isnan(df)):
        return math.nan
    from scipy import stats

    dist = stats.norm if df is None or math.isinf(df) else stats.t(df)
    return float((dist.ppf(1 - alpha / 2) + dist.ppf(power)) * se)


def planned_mdd(
    run_sd_a: float,
    run_sd_b: float,
    instr_sd: float,
    runs: int,
    instructions: int,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """Detectable difference for a planned experiment with `runs` runs per arm and `instructions` instructions,
    with the Satterthwaite degrees of freedom the test will then have (few runs: Student's t, not the normal).

    run_sd_*: sd over runs of one run's mean score (0 for a fixed side); instr_sd: sd over instructions of
    D_i. From a pilot comparison c: run_sd_a = sqrt(c.components["runs_a"] * c.runs_a), instr_sd =
    sqrt(c.components["instructions"] * c.n_instructions).
    """
    parts = [(run_sd_a**2 / runs, runs - 1), (run_sd_b**2 / runs, runs - 1), (instr_sd**2 / instructions,
                                                                              instructions - 1)]
    variance = sum(v for v, _ in parts)
    return minimum_detectable_difference(math.sqrt(variance), _satterthwaite(variance, parts), alpha, power)


def runs_needed(
    target: float,
    run_sd_a: float,
    run_sd_b: float,
    instr_sd: float,
    instructions: int,
    alpha: float = 0.05,
    power: float = 0.8,
    max_runs: int = 100,
) -> int | None:
    """Smallest runs per arm with planned_mdd <= target; None when max_runs is not enough.

    More runs cannot shrink the instruction part, so a target below it is never reached. The search starts
    at two runs because one run leaves the run variance unestimable, unless neither side has run variance.
    """
    first = 1 if run_sd_a == 0 and run_sd_b == 0 else 2
    for runs in range(first, max_runs + 1):
        if planned_mdd(run_sd_a, run_sd_b, instr_sd, runs, instructions, alpha, power) <= target:
            return runs
    return None


def verdict(comparison: Comparison | Mapping, p_adjusted: float, expected: str, alpha: float = 0.05) -> str:
    """The claim's outcome: expected "higher" (a beats b) or "similar" (a matches b); p_adjusted after holm."""
    if expected not in EXPECTED:
        raise ValueError(f"verdict: expected must be one of {EXPECTED}, got {expected!r}")
    diff, se = _field(comparison, "diff"), _field(comparison, "se")
    if se is None or math.isnan(se):
        return _field(comparison, "undetermined") or UNDETERMINED_NO_SE
    if se == 0:  # a difference without variation is not evidence, however large
        return UNDETERMINED_NO_VARIATION
    if not (p_adjusted < alpha and diff != 0):  # a nan p is not significant either
        return NOT_REPRODUCED if expected == "higher" else NO_DIFFERENCE
    if diff > 0:
        return AGREES if expected == "higher" else DIFFERS_BETTER
    return DISAGREES if expected == "higher" else DIFFERS_WORSE


def _field(source, name: str):
    return source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
