"""The offline judge (outside CI): a SmolLM2-135M reward model trained on AE1 and AE2 judgements of the
train-split instructions (several times more pairs than the ensembles under test see), and its agreement
with GPT-4 (AE1) and GPT-4-turbo (AE2) on pairs of instructions it never saw, overall and on the pairs
where the longer output lost, next to the "longer wins" rule. Also times the evaluation stages
(AlpacaEval-style win rate and MT-Bench grading) with this judge on SmolLM2's own outputs.

    python bench/offline_judge.py [--pairs 2000] [--held-out 300]

Needs RMENS_DATA_DIR. Results: bench/out/offline_judge.json and .txt (the judge is kept in
bench/out/offline-judge/ for reuse).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import transformers
from results import OUT, save_results

from rmens.data.config import DataConfig
from rmens.data.loaders import data_root, load_pairs
from rmens.data.prompts import alpaca_eval_instructions, reference_outputs
from rmens.evaluation import alpaca_eval, mt_bench
from rmens.evaluation.judges import RewardModelJudge
from rmens.evaluation.offline_judge import agreement_report, judge_split
from rmens.generation import generate
from rmens.generation_config import GenerationConfig
from rmens.models.backbone import load_policy, load_tokenizer
from rmens.models.config import EnsembleConfig
from rmens.seeding import python_random
from rmens.training.config import TrainConfig
from rmens.training.trainer import train_ensemble


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-instructions", type=int, default=32)
    parser.add_argument("--mt-bench-questions", type=int, default=16)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    rng = python_random(0)
    results: dict = {}

    pools = {name: judge_split(load_pairs(DataConfig(source="alpaca_eval", subset=name, soft_labels=True)), 0.2)
             for name in ("ae1", "ae2")}
    train = rng.sample(pools["ae1"][0] + pools["ae2"][0], args.pairs)
    held = {name: rng.sample(pool[1], args.held_out) for name, pool in pools.items()}
    folder = OUT / "offline-judge"
    cfg = EnsembleConfig(kind="linear", k=1, backbone="smollm2-135m", max_length=args.max_length,
                         max_prompt_length=args.max_length // 3, seed=101)
    start = time.perf_counter()
    train_ensemble(cfg, TrainConfig(epochs=1, batch_size=8, lr=2e-5, warmup_ratio=0.03), train, output_dir=folder)
    results["train_pairs"] = len(train)
    results["train_wall_s"] = time.perf_counter() - start
    judge = RewardModelJudge(folder, name="offline-judge", max_length=args.max_length)
    for name, pairs in held.items():
        results[f"agreement_{name}"] = agreement_report(judge, pairs)
        print(name, json.dumps(results[f"agreement_{name}"]), flush=True)

    # Evaluation wall times with this judge, on SmolLM2-135M-Instruct's own outputs.
    rows = alpaca_eval_instructions("test")[: args.eval_instructions]
    refs = reference_outputs("gpt4_1106_preview")
    instructions = [r["instruction"] for r in rows]
    policy, tokenizer = load_policy("smollm2-135m"), load_tokenizer("smollm2-135m", padding_side="left")
    gen = GenerationConfig(max_new_tokens=64, batch_size=16, temperature=0.7, top_p=0.9)
    start = time.perf_counter()
    outputs = generate(policy, tokenizer, instructions, gen).texts
    results["generate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    wr = alpaca_eval.win_rate(judge, instructions, outputs, [refs[i] for i in instructions], generator="smollm2")
    results["win_rate_s"] = time.perf_counter() - start
    results["win_rate"] = {k: wr[k] for k in ("win_rate", "standard_error", "n_total", "length_controlled_unavailable")}
    questions = mt_bench.load_questions(data_root() / "mt_bench")[: args.mt_bench_questions]
    start = time.perf_counter()
    answers = mt_bench.answer_questions(functools.partial(generate, policy, tokenizer), questions, gen)
    results["mt_bench_answer_s"] = time.perf_counter() - start
    start = time.perf_counter()
    mapping = mt_bench.RewardScoreMapping.calibrate(judge, instructions, [refs[i] for i in instructions])
    grades = mt_bench.grade(judge, questions, answers, mapping=mapping)
    results["mt_bench_grade_s"] = time.perf_counter() - start
    results["mt_bench"] = mt_bench.summarize(grades)
    results["mt_bench_mapping"] = mapping.__dict__

    lines = [f"offline judge: SmolLM2-135M reward model on {len(train)} AE1+AE2 pairs "
             f"(train-split instructions), {results['train_wall_s'] / 60:.0f} min"]
    for name in ("ae1", "ae2"):
        r = results[f"agreement_{name}"]
        lines.append(f"  {name} held-out ({r['n_pairs']} pairs, unseen instructions): agreement {r['agreement']:.3f}; "
                     f"where the longer lost ({r['n_longer_lost']}): {r['agreement_longer_lost']:.3f}; "
                     f"'longer wins' rule: {r['length_rule_agreement']:.3f}")
    lines.append(f"  SmolLM2 vs gpt4_1106_preview on {len(instructions)} test instructions: win rate "
                 f"{results['win_rate']['win_rate']:.1f}% +- {results['win_rate']['standard_error']:.1f}; "
                 f"generation {results['generate_s']:.0f} s, judging {results['win_rate_s']:.1f} s")
    lines.append(f"  MT-Bench ({len(questions)} questions, reward judge mapped to 1-10): "
                 f"{results['mt_bench']['score']:.2f} (turn 1 {results['mt_bench']['turn_1']:.2f}, "
                 f"turn 2 {results['mt_bench']['turn_2']:.2f}); answering {results['mt_bench_answer_s']:.0f} s, "
                 f"grading {results['mt_bench_grade_s']:.1f} s")
    save_results("offline_judge", results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
