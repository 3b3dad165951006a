"""Real-data check (outside CI): a single reward model, a linear k=5 and a LoRA k=5 ensemble trained on
SmolLM2-135M with about a thousand AlpacaEval-1 (GPT-4) judgements, scored on held-out pairs whose
instructions none of them saw, next to the accuracy of "the longer response wins" on the same pairs.

Responses are truncated to fit the CPU (max_length tokens per prompt+response). Needs RMENS_DATA_DIR.

    python bench/real_data_check.py [--pairs 1000] [--held-out 200] [--max-length 128]

Results go to bench/out/real_data_check.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import transformers
from results import save_results, write_json

from rmens.config import derive
from rmens.data.config import DataConfig
from rmens.data.loaders import load_pairs
from rmens.data.splits import split_by_instruction
from rmens.evaluation.offline_judge import agreement_report, length_rule_accuracy
from rmens.evaluation.reward_model import evaluate_reward_model
from rmens.models.backbone import load_tokenizer
from rmens.models.config import EnsembleConfig, LoraSettings
from rmens.reward import EnsembleReward
from rmens.seeding import python_random
from rmens.training.config import TrainConfig
from rmens.training.trainer import train_ensemble


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--arms", default="single,linear-k5,lora-k5")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    pool = load_pairs(DataConfig(source="alpaca_eval", subset="ae1", max_pairs=None, seed=0))
    train_pool, held_pool = split_by_instruction(pool, 0.2, salt="real-data-check")
    rng = python_random(0)
    train = rng.sample(train_pool, args.pairs)
    held = rng.sample(held_pool, args.held_out)
    print(f"{len(train)} training pairs, {len(held)} held-out pairs of unseen instructions", flush=True)

    base = EnsembleConfig(backbone="smollm2-135m", max_length=args.max_length, max_prompt_length=args.max_length // 3,
                          lora=LoraSettings(top_layers=0.25, rank=8))
    train_cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, lora_lr=5e-5, warmup_ratio=0.03,
                            schedule="cosine", eval_every=0, progress=True)
    arms = {"single": derive(base, kind="linear", k=1),
            "linear-k5": derive(base, kind="linear", k=5),
            "lora-k5": derive(base, kind="lora", k=5)}
    results = {"length_rule_accuracy": length_rule_accuracy(held), "train_pairs": len(train),
               "held_out_pairs": len(held), "max_length": args.max_length, "arms": {}}
    for name in args.arms.split(","):
        start = time.perf_counter()
        result = train_ensemble(arms[name], train_cfg, train)
        train_s = time.perf_counter() - start
        tokenizer = load_tokenizer("smollm2-135m")
        reward = EnsembleReward(result.ensemble.eval(), tokenizer, batch_size=16, max_length=args.max_length)
        start = time.perf_counter()
        report = agreement_report(reward, held)
        metrics = evaluate_reward_model(reward, held)
        score_s = time.perf_counter() - start
        results["arms"][name] = {**report, "ece": metrics["ece"], "member_accuracy": metrics["member_accuracy"],
                                 "train_wall_s": train_s, "eval_wall_s": score_s,
                                 "steps": {k: s.steps for k, s in result.stages.items()}}
        print(json.dumps({name: results["arms"][name]}, indent=2), flush=True)
        write_json("real_data_check", results)  # after every arm, so a long run keeps what it finished
    lines = [f"held-out pairs: {len(held)} (instructions unseen in training); 'longer wins' rule: "
             f"{results['length_rule_accuracy']:.3f}",
             f"{'arm':<12}{'accuracy':>10}{'longer lost':>13}{'ECE':>8}{'train':>10}{'eval':>8}"]
    for name, row in results["arms"].items():
        lines.append(f"{name:<12}{row['agreement']:>10.3f}{row['agreement_longer_lost']:>13.3f}{row['ece']:>8.3f}"
                     f"{row['train_wall_s'] / 60:>8.1f}min{row['eval_wall_s']:>7.0f}s")
    save_results("real_data_check", results, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
