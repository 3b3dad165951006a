"""How many training runs and pools the primary comparison needs to detect a given difference, from the
variance parts a finished reference experiment measured (its results.json).

    python bench/power_plan.py runs/experiment-cpu-plain/results.json [--target 0.03] [--pool-sd 0.12 ...]
                               [--run-sd 0.02 ...]

The primary comparison's standard error is sqrt(run_sd_a^2 / R + run_sd_b^2 / R + pool_sd^2 / I) (R runs per
arm, I pools; rmens.evaluation.stats), so a pilot's run_sd and pool_sd give the detectable difference of any
planned size. Prints a grid of minimum detectable differences (two-sided alpha and power of the experiment,
Student's t at the Satterthwaite df of each size) and the fewest runs that reach the target, for the measured
run and pool sds and for any others given (better-trained arms vary less from seed to seed, and pick alike
more often: smaller run and pool sds; both arms are given the same run sd).
Writes bench/out/power_plan_<size>.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from results import OUT, save_results

from rmens.evaluation.stats import planned_mdd, runs_needed

RUNS = (3, 5, 10, 20, 40)
POOLS = (140, 290, 580, 1160)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="results.json of a finished reference experiment")
    parser.add_argument("--target", type=float, default=0.03, help="difference to detect (win rate)")
    parser.add_argument("--pool-sd", type=float, action="append", default=[], help="other pool sds to plan for")
    parser.add_argument("--run-sd", type=float, action="append", default=[], help="other run sds to plan for")
    parser.add_argument("--bench-out", type=Path, default=OUT)
    return parser.parse_args(argv)


def plan(run_sd_a: float, run_sd_b: float, pool_sd: float, target: float, alpha: float, power: float) -> dict:
    grid = {f"{runs} runs x {pools} pools": planned_mdd(run_sd_a, run_sd_b, pool_sd, runs, pools, alpha, power)
            for runs in RUNS for pools in POOLS}
    needed = {str(pools): runs_needed(target, run_sd_a, run_sd_b, pool_sd, pools, alpha, power) for pools in POOLS}
    return {"run_sd_a": run_sd_a, "run_sd_b": run_sd_b, "pool_sd": pool_sd, "mdd": grid, "runs_needed": needed}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = json.loads(args.results.read_text())
    primary = results["primary"]
    measured = primary["plan"]
    if measured["run_sd_a"] is None or measured["run_sd_b"] is None:
        print("the primary comparison has a side with one run: no run variance to plan from", file=sys.stderr)
        return 1
    alpha, power = _level(results)
    run_sds = [(measured["run_sd_a"], measured["run_sd_b"])] + [(sd, sd) for sd in args.run_sd]
    plans = [plan(run_a, run_b, pool_sd, args.target, alpha, power)
             for run_a, run_b in run_sds for pool_sd in [measured["pool_sd"], *args.pool_sd]]
    lines = [f"power plan from {args.results} (size {results['size']}): primary {primary['claim']}, measured "
             f"at {primary['runs_a']}/{primary['runs_b']} runs and {primary['pools']} pools: run sd "
             f"{measured['run_sd_a']:.3f} / {measured['run_sd_b']:.3f}, pool sd {measured['pool_sd']:.3f}; "
             f"target {args.target}, alpha {alpha}, power {power}"]
    for p in plans:
        lines.append(f"run sd {p['run_sd_a']:.3f} / {p['run_sd_b']:.3f}, pool sd {p['pool_sd']:.3f}: runs per arm to "
                     f"detect {args.target}: "
                     + ", ".join(f"{n} at {pools} pools" if n else f"none up to 100 at {pools} pools"
                                 for pools, n in p["runs_needed"].items()))
        lines += [f"  {size}: MDD {mdd:.3f}" for size, mdd in p["mdd"].items()]
    save_results(f"power_plan_{results['size']}", {"source": str(args.results), "target": args.target,
                                                   "alpha": alpha, "power": power, "plans": plans},
                 lines, args.bench_out)
    return 0


def _level(results: dict) -> tuple[float, float]:
    """The experiment's alpha and power, from the settings it ran with (results.json keeps the config's)."""
    config = results.get("config", {})
    return float(config.get("alpha", 0.05)), float(config.get("power", 0.8))


if __name__ == "__main__":
    sys.exit(main())
