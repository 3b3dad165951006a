"""The reference experiment as a plain script over the library alone (no Prefect, no MLflow): what a GPU
machine with only torch, transformers, peft and accelerate runs. `rmens experiment` runs the same steps
as a Prefect flow with MLflow tracking.

    python bench/reference_experiment.py --size {tiny,cpu,gpu-check,gpu} [--eval-data DIR] [--out DIR]
                                         [--mt-bench-grades FILE] [--part rewards|all] [--set key=value ...]

--eval-data names a folder of AE-format files (ae1_gpt4_pairs*.jsonl.gz, ae2_gpt4turbo_pairs*.jsonl.gz)
whose instructions become the evaluation pools (and leave every training set); without it, a quarter
of the training folder's instructions is held out. A share of the generating systems is held out too
(data.generator_fraction): the pools hold only theirs. --mt-bench-grades names MT-Bench's released GPT-4
grades (default $RMENS_DATA_DIR/mt_bench/gpt4_single_grades.jsonl.gz). The output folder gets logged_bon.json,
report.md,
results.json and the curves; a second run reuses every finished step, so `--part rewards` followed by
`--part all` runs the PPO half on top of the first. The run's wall time and headline numbers also go to
bench/out/reference_experiment_<size>.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from results import OUT, save_results

from rmens.evaluation.logged_bon import evaluation_sets
from rmens.experiment.config import SIZES, load_experiment
from rmens.experiment.runner import run_experiment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--eval-data", help="folder of AE-format annotation files to evaluate on")
    parser.add_argument("--data-dir", help="folder of training verdicts (default $RMENS_DATA_DIR/alpaca_eval)")
    parser.add_argument("--mt-bench-grades", help="MT-Bench GPT-4 single-answer grades (JSONL[.gz])")
    parser.add_argument("--out", help="output folder (default runs/experiment-<size>-plain)")
    parser.add_argument("--part", choices=["rewards", "all"], default="all",
                        help="rewards: stop before PPO (a GPU check runs the two parts in separate calls)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--bench-out", type=Path, default=OUT, help="where the run's summary goes (bench/out)")
    return parser.parse_args(argv)


def headline(results: dict) -> list[str]:
    c = results["primary"]
    def number(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"primary: {c['claim']}: {c['diff']:+.3f} ± {number(c['se'])}, p {number(c['p'])}, MDD {number(c['mdd'])} "
             f"-> {c['verdict']}"]
    for name, entry in evaluation_sets(results["logged_bon"]).items():
        metric, n = entry["metric"], entry["ns"][-1]
        base = {b: rows[-1][metric] for b, rows in entry["baselines"].items()}
        best = sorted(entry["arms"].items(), key=lambda kv: -kv[1][-1][metric])[:3]
        lines.append(f"{name}: n={n} " + ", ".join(f"{b} {v:.3f}" for b, v in base.items())
                     + f", gold judge {entry['gold']['gold/mean'][-1][metric]:.3f}; top arms: "
                     + ", ".join(f"{s} {rows[-1][metric]:.3f}" for s, rows in best))
    lines += [f"{c['setting']}: {c['a']} vs {c['b']}: {c['diff']:+.3f} -> {c['verdict']}"
              for c in results["claims"] + results["mt_bench_claims"] + results["checks"]]
    return lines


def step_times(out: Path) -> dict[str, float]:
    """Each step's compute time, from its done.json, whether this call computed it or reused it."""
    return {path.parent.name: json.loads(path.read_text())["wall_s"] for path in sorted(out.glob("steps/*/done.json"))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = load_experiment(args.size, args.set, eval_data=args.eval_data, data_dir=args.data_dir,
                          mt_bench_grades=args.mt_bench_grades)
    run = run_experiment(cfg, args.out or f"runs/experiment-{args.size}-plain", part=args.part)
    results = json.loads(open(f"{run['out']}/results.json").read())
    steps = step_times(Path(run["out"]))
    lines = [f"reference experiment, size {args.size}, part {args.part}: {run['wall_s'] / 60:.1f} min "
             f"({len(run['computed'])} steps computed, {len(run['reused'])} reused); the steps' own compute time, "
             f"whenever computed: {sum(steps.values()) / 60:.1f} min; results in {run['out']}"]
    save_results(f"reference_experiment_{args.size}", {"run": run, "step_wall_s": steps, "results": results},
                 lines + headline(results), args.bench_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
