import math

import numpy as np
import pytest
from scipy import stats as sps

from rmens.evaluation import stats
from rmens.evaluation.stats import compare, holm, minimum_detectable_difference, planned_mdd, runs_needed, verdict

# R_a = 2, R_b = 3, I = 4. Run means of a: 0.5, 0.7; of b: 0.5, 0.3, 0.4. Column means of a: 0.7 0.5 0.9 0.3,
# of b: 0.4 each, so D = 0.3 0.1 0.5 -0.1 and diff = 0.6 - 0.4 = 0.2.
A = np.array([[0.6, 0.4, 0.8, 0.2], [0.8, 0.6, 1.0, 0.4]])
B = np.array([[0.5] * 4, [0.3] * 4, [0.4] * 4])


def test_hand_computed_example():
    result = compare(A, B)
    v_a = (0.1**2 + 0.1**2) / 1 / 2  # var of 0.5, 0.7 is 0.02; / R_a
    v_b = (0.1**2 + 0.1**2 + 0) / 2 / 3  # var of 0.5, 0.3, 0.4 is 0.01; / R_b
    v_i = (0.1**2 + 0.1**2 + 0.3**2 + 0.3**2) / 3 / 4  # var of D (mean 0.2) is 0.2 / 3; / I
    assert (v_a, v_b, v_i) == pytest.approx((0.01, 1 / 300, 1 / 60))
    assert result.components == pytest.approx({"runs_a": v_a, "runs_b": v_b, "instructions": v_i})
    assert result.diff == pytest.approx(0.2)
    assert result.se == pytest.approx(math.sqrt(0.03))
    # 0.03^2 / (0.01^2 / 1 + (1/300)^2 / 2 + (1/60)^2 / 3) = 0.0009 / (107 / 540000)
    assert result.df == pytest.approx(486 / 107)
    assert result.t == pytest.approx(2 / math.sqrt(3))
    assert result.p == pytest.approx(2 * sps.t.sf(2 / math.sqrt(3), 486 / 107))
    assert (result.runs_a, result.runs_b, result.n_instructions, result.undetermined) == (2, 3, 4, None)
    assert result.mdd() == pytest.approx((sps.t.ppf(0.975, 486 / 107) + sps.t.ppf(0.8, 486 / 107)) * math.sqrt(0.03))


def test_two_fixed_sides_reduce_to_paired_t_test():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=(1, 30)), rng.uniform(size=(1, 30))
    expected = sps.ttest_rel(a[0], b[0])
    unpaired = compare(a, b, a_fixed=True, b_fixed=True)
    for result in (unpaired, compare(a, b, paired_runs=True, a_fixed=True, b_fixed=True)):
        assert result.t == pytest.approx(expected.statistic)
        assert result.p == pytest.approx(expected.pvalue)
        assert result.df == pytest.approx(29)


def test_fixed_baseline_has_no_run_part():
    result = compare(A, B[:1], b_fixed=True)
    assert result.components["runs_b"] == 0.0
    d = A.mean(axis=0) - 0.5
    v_i = np.var(d, ddof=1) / 4
    assert result.se == pytest.approx(math.sqrt(0.01 + v_i))
    assert result.df == pytest.approx((0.01 + v_i) ** 2 / (0.01**2 / 1 + v_i**2 / 3))


def test_paired_runs_tests_the_per_run_difference():
    rng = np.random.default_rng(1)
    b = rng.uniform(size=(4, 50))
    offsets = np.array([0.02, -0.01, 0.05, 0.0])
    result = compare(b + 0.1 + offsets[:, None], b, paired_runs=True)
    # a - b = 0.1 + offset: the same in every instruction, so only the run part remains, with df R - 1.
    assert result.components["instructions"] == 0.0
    assert result.diff == pytest.approx(0.1 + offsets.mean())
    assert result.se == pytest.approx(math.sqrt(np.var(offsets, ddof=1) / 4))
    assert result.df == pytest.approx(3)
    assert result.p == pytest.approx(2 * sps.t.sf(result.diff / result.se, 3))


def test_one_unfixed_run_or_one_instruction_is_undetermined():
    one_run = compare(A[:1], B)
    assert math.isnan(one_run.se) and math.isnan(one_run.p)
    assert verdict(one_run, one_run.p, "higher") == stats.UNDETERMINED_ONE_RUN
    paired = compare(A[:1], B[:1], paired_runs=True)
    assert math.isnan(paired.se) and paired.undetermined == stats.UNDETERMINED_ONE_RUN
    one_instruction = compare(A[:, :1], B[:, :1])
    assert math.isnan(one_instruction.se) and math.isnan(one_instruction.p)
    assert verdict(one_instruction, 0.0, "similar") == stats.UNDETERMINED_ONE_INSTRUCTION
    assert verdict({"diff": 0.3, "se": math.nan}, 0.0, "higher") == stats.UNDETERMINED_NO_SE
    assert math.isnan(one_run.mdd())


def test_zero_se_never_agrees():
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(1, 20))
    # x + 0.1 - x is 0.1 only up to rounding; that rounding must not become a huge t.
    unpaired = compare(x + 0.1, x, a_fixed=True, b_fixed=True)
    for result in (unpaired, compare(x + 0.1, x, paired_runs=True, a_fixed=True, b_fixed=True)):
        assert result.se == 0 and math.isnan(result.p)
        assert result.undetermined == stats.UNDETERMINED_NO_VARIATION
        assert verdict(result, 0.0, "higher") == stats.UNDETERMINED_NO_VARIATION
    assert verdict({"diff": 0.5, "se": 0.0}, 0.0, "higher") == stats.UNDETERMINED_NO_VARIATION


def test_verdict_rules():
    better, worse = {"diff": 0.1, "se": 0.02}, {"diff": -0.1, "se": 0.02}
    assert verdict(better, 0.01, "higher") == stats.AGREES == "agrees"
    assert verdict(better, 0.01, "similar") == stats.DIFFERS_BETTER
    assert verdict(worse, 0.01, "higher") == stats.DISAGREES
    assert verdict(worse, 0.01, "similar") == stats.DIFFERS_WORSE
    assert verdict(better, 0.2, "higher") == stats.NOT_REPRODUCED
    assert verdict(better, 0.05, "similar") == stats.NO_DIFFERENCE  # alpha itself is not below alpha
    assert verdict(better, math.nan, "higher") == stats.NOT_REPRODUCED
    with pytest.raises(ValueError, match="expected must be one of"):
        verdict(better, 0.01, "lower")


def test_holm():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # nan is left out of the family: m = 2 here.
    adjusted = holm([0.02, math.nan, 0.04])
    assert math.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.04) and adjusted[2] == pytest.approx(0.04)
    assert holm([0.5, 0.3, 0.9]) == pytest.approx([1.0, 0.9, 1.0])  # 3 * 0.3, then 2 * 0.5 capped
    assert holm([]) == []
    p = np.random.default_rng(3).uniform(0, 0.2, size=12)
    adjusted = np.array(holm(p))
    order = np.argsort(p)
    assert np.all(np.diff(adjusted[order]) >= 0) and np.all(adjusted >= p) and np.all(adjusted <= 1)


def test_minimum_detectable_difference_and_planning():
    assert minimum_detectable_difference(1.0, None) == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    assert minimum_detectable_difference(0.01, 1e9) == pytest.approx(0.028016, abs=1e-5)
    assert minimum_detectable_difference(1.0, 5) > minimum_detectable_difference(1.0, None)
    assert math.isnan(minimum_detectable_difference(math.nan, 5))
    assert math.isnan(minimum_detectable_difference(1.0, math.nan))
    # planned: Student's t at the Satterthwaite df of the planned parts (here about 30), not the normal
    parts = [0.05**2 / 3, 0.04**2 / 3, 0.3**2 / 200]
    df = sum(parts) ** 2 / (parts[0] ** 2 / 2 + parts[1] ** 2 / 2 + parts[2] ** 2 / 199)
    factor = sps.t(df).ppf(0.975) + sps.t(df).ppf(0.8)
    assert planned_mdd(0.05, 0.04, 0.3, 3, 200) == pytest.approx(factor * math.sqrt(sum(parts)), rel=1e-6)
    assert planned_mdd(0.05, 0.04, 0.3, 3, 200) > (1.959964 + 0.841621) * math.sqrt(sum(parts))
    # The instruction part alone: factor * 0.3 / sqrt(200) = 0.0594; no number of runs gets below it.
    assert runs_needed(0.05, 0.05, 0.05, 0.3, 200) is None
    target = 0.08
    runs = runs_needed(target, 0.05, 0.05, 0.3, 200)
    assert runs is not None and runs > 2
    assert planned_mdd(0.05, 0.05, 0.3, runs, 200) <= target < planned_mdd(0.05, 0.05, 0.3, runs - 1, 200)
    assert runs_needed(0.07, 0.0, 0.0, 0.3, 200) == 1  # two fixed sides: runs do not matter


def test_runs_random_keep_the_false_positive_rate():
    """Under the null, with a seed effect, compare rejects at about alpha; ignoring the runs does not."""
    rng = np.random.default_rng(4)
    n, runs, instructions = 400, 3, 100
    instruction_effect = rng.normal(0, 0.2, size=(n, 1, 1, instructions))
    seed_effect = rng.normal(0, 0.05, size=(n, 2, runs, 1))
    scores = 0.5 + instruction_effect + seed_effect + rng.normal(0, 0.3, size=(n, 2, runs, instructions))
    ours = np.array([compare(s[0], s[1]).p for s in scores])
    naive = np.array([sps.ttest_rel(s[0].mean(axis=0), s[1].mean(axis=0)).pvalue for s in scores])
    assert np.mean(ours < 0.05) <= 0.07
    assert np.mean(naive < 0.05) > 0.15


def test_bad_input():
    with pytest.raises(ValueError, match=r"same instructions \(columns\), got \(2, 4\) and \(3, 3\)"):
        compare(A, B[:, :3])
    bad = A.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="a has non-finite value nan at run 1, instruction 2"):
        compare(bad, B)
    with pytest.raises(ValueError, match="b has non-finite value inf at run 0, instruction 0"):
        compare(A, np.full((2, 4), np.inf))
    with pytest.raises(ValueError, match=r"same runs on both sides, got a \(2, 4\) and b \(3, 4\)$"):
        compare(A, B, paired_runs=True)
    with pytest.raises(ValueError, match="2-D"):
        compare(A[0], B)
    with pytest.raises(ValueError, match="b_fixed means a deterministic side with one row"):
        compare(A, B, b_fixed=True)
