"""The experiment's verdicts on hand-made evidence: PPO at matched KL, the gold judge's check, the pooled
conservative-rule claim (paired run by run), Holm over a family, and the primary comparison's power plan."""

import math

import numpy as np
import pytest

from rmens.evaluation import stats
from rmens.experiment.config import load_experiment
from rmens.experiment.verdicts import (
    Evidence,
    bon_claims,
    finish,
    gold_check,
    matched_kl,
    ppo_claims,
    primary,
    value_at_kl,
)


def points(kls, values):
    return [{"step": i, "kl": kl, "gold_values_ae1": v, "gold_values_ae2": v} for i, (kl, v) in
            enumerate(zip(kls, values))]


def test_values_at_a_kl_are_interpolated_between_the_checkpoints_around_it():
    run = points([0.0, 1.0, 3.0], [[0.0, 1.0], [1.0, 1.0], [3.0, 0.0]])
    assert value_at_kl(run, "gold_values_ae1", 2.0).tolist() == [2.0, 0.5]
    assert value_at_kl(run, "gold_values_ae1", -0.1).tolist() == [0.0, 1.0]
    # estimated KL can fall back: the first crossing counts
    bumpy = points([0.0, 2.0, 1.0, 4.0], [[0.0], [2.0], [9.0], [4.0]])
    assert value_at_kl(bumpy, "gold_values_ae1", 1.0).tolist() == [1.0]
    with pytest.raises(ValueError, match="never reaches KL 5.000"):
        value_at_kl(run, "gold_values_ae1", 5.0)
    assert matched_kl([run, points([0.0, 0.5, 2.5], [[0.0]] * 3)]) == 2.5


def test_ppo_arms_are_compared_at_the_kl_every_run_reached():
    cfg = load_experiment("tiny", ["ppo_runs=2", "pools.judges=[ae1]", "primary.judge=ae1"])
    # the single model's runs reach KL 2 and gain 0.1 per nat; the ensemble's reach KL 4 and gain 0.2 per nat
    single = [points([0.0, 2.0], [[0.5] * 3, [0.7 + e] * 3]) for e in (0.0, 0.02)]
    ensemble = [points([0.0, 4.0], [[0.5] * 3, [1.3 + e] * 3]) for e in (0.0, 0.04)]
    claims = ppo_claims(cfg, {"single/mean": single, "linear-k5/mean": ensemble, "linear-k5/uwo0.5": ensemble})
    versus_single = next(c for c in claims if c["b"] == "single/mean")
    assert versus_single["kl"] == 2.0 and "matched KL 2.00" in versus_single["setting"]
    # at KL 2 the ensemble is half way: 0.5 + 0.4 (+ half its run offset), the single model at 0.7 (+ its)
    assert versus_single["a_value"] == pytest.approx(0.91) and versus_single["b_value"] == pytest.approx(0.71)
    rule = next(c for c in claims if c["a"] == "linear-k5/uwo0.5")
    assert rule["paired_runs"] and rule["diff"] == 0.0  # same reward runs, same curves


def test_the_gold_check_withholds_ppo_verdicts_when_the_gold_judge_is_not_better():
    cfg = load_experiment("tiny", ["pools.judges=[ae1]", "primary.judge=ae1"])
    labels = [arm.run_label(r) for arm in cfg.arms for r in range(cfg.runs_of(arm))]

    rng = np.random.default_rng(0)
    proxy = {label: (0.6 + rng.normal(0, 0.01) + rng.normal(0, 0.02, 50)).tolist() for label in labels}

    def evidence(gold, spread=0.02):
        per_pool = (gold + np.random.default_rng(1).normal(0, spread, 50)).tolist()
        agreement = {"ae1": {"gold": {"per_pool": per_pool}, **{label: {"per_pool": v} for label, v in proxy.items()}}}
        return Evidence({}, agreement, {"judges": {"ae1": {}}})

    ok, rows = gold_check(cfg, evidence(0.66))
    assert ok and all(row["margin"] > 0.02 and row["lower_bound"] > 0 for row in rows)
    ok, rows = gold_check(cfg, evidence(0.61))  # better, but by less than the margin
    assert not ok and {row["arm"] for row in rows if not row["ok"]} == {arm.label for arm in cfg.arms}
    ok, rows = gold_check(cfg, evidence(0.66, spread=0.8))  # by the margin, but too noisy to tell
    assert not ok and all(row["margin"] > 0.02 for row in rows) and any(row["lower_bound"] <= 0 for row in rows)


def synthetic_evidence(cfg, effect: float, run_sd: float, seed: int = 0, pools: int = 60) -> Evidence:
    """Per-run, per-pool Best-of-n values: every arm at 0.5, lora-k5 higher by `effect`, a run offset of sd
    `run_sd`, pool noise; the conservative rules equal the mean plus a per-run constant."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, 0.15, pools)
    values = {}
    for arm in cfg.arms:
        base = 0.5 + (effect if arm.label == "lora-k5" else 0.0)
        runs = [base + rng.normal(0, run_sd) + shared + rng.normal(0, 0.05, pools) for _ in range(cfg.runs_of(arm))]
        for rule in arm.rules(cfg.rules):
            shift = 0.01 if rule.name != "mean" else 0.0
            values[f"arms:{arm.label}/{rule.name}"] = {"4": [(r + shift).tolist() for r in runs]}
    bon = {"judges": {"ae2": {"ns": [1, 2, 4]}}}
    return Evidence({"ae2": values}, {}, bon)


def test_a_conservative_rule_is_tested_run_by_run_and_the_family_is_holm_corrected():
    cfg = load_experiment("tiny", ["pools.judges=[ae2]", "runs=3"])
    claims = finish(bon_claims(cfg, synthetic_evidence(cfg, effect=0.0, run_sd=0.05), ["ae2"], "claims"),
                    cfg.alpha, cfg.power)
    assert not [c for c in claims if (c["a"], c["b"]) == ("lora-k5/mean", "single/mean")]  # the primary, alone
    pairs = [(c["set"], c["a"], c["b"]) for c in claims]
    assert len(pairs) == len(set(pairs))  # LoRA against the full ensemble is one test, not two
    rules = [c for c in claims if c["a"].startswith("ensembles/")]
    # the same runs under two rules differ by exactly 0.01 everywhere: paired, the run offsets cancel
    assert len(rules) == 3 and all(c["paired_runs"] and c["diff"] == pytest.approx(0.01) for c in rules)
    assert all(c["se"] == 0 and c["verdict"] == stats.UNDETERMINED_NO_VARIATION for c in rules)
    tested = [c for c in claims if c["p"] is not None and not math.isnan(c["p"])]
    assert [c["p_holm"] for c in tested] == pytest.approx(stats.holm([c["p"] for c in tested]))
    assert all(c["mdd"] > 0 for c in tested)


def test_the_primary_comparison_detects_a_large_effect_and_plans_for_a_small_one():
    cfg = load_experiment("tiny", ["pools.judges=[ae2]", "runs=4"])
    found = primary(cfg, synthetic_evidence(cfg, effect=0.3, run_sd=0.02, seed=1))
    assert found["verdict"] == stats.AGREES and found["p_holm"] == found["p"] < 0.05
    assert found["plan"]["run_sd_a"] == pytest.approx(0.02, rel=1.5) and found["plan"]["runs_needed"]
    nothing = primary(cfg, synthetic_evidence(cfg, effect=0.0, run_sd=0.05, seed=2))
    assert nothing["verdict"] == stats.NOT_REPRODUCED and nothing["mdd"] > 0.05
