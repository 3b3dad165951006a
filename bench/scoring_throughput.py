"""Scoring throughput of EnsembleReward against a bare forward of the same backbone on the same batches,
and against the previous scoring path (one response at a time through the chat template and the
tokenizer, fp32 forwards), measured side by side in one process.

    python bench/scoring_throughput.py                      # SmolLM2-135M, 128 responses at 128 tokens (CPU)
    python bench/scoring_throughput.py --responses 4096 --max-length 384 --batch-size 128   # a GPU

Tokens per second count real (non-padding) tokens. "bare forward" runs the ensemble alone on batches
that were encoded and padded in advance, in the order and precision EnsembleReward uses (bf16 autocast
on a GPU that supports it, fp32 on a CPU): the ceiling scoring can reach. Targets: at least 0.7 of the
bare forward on a GPU, and no slower than the previous path on the CPU. Responses are AlpacaEval outputs
from $RMENS_DATA_DIR when it is set, else synthetic text. Minimum over repeats (timing noise on shared
CPUs is about 15%). Results: bench/out/scoring_throughput.json and .txt.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from results import save_results

from rmens.data.encoding import pad_batch
from rmens.models.backbone import load_tokenizer
from rmens.models.config import EnsembleConfig
from rmens.models.ensemble import build_ensemble
from rmens.reward import EnsembleReward
from rmens.seeding import python_random


def responses(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, responses): AlpacaEval instructions and logged outputs, or synthetic text."""
    root = os.environ.get("RMENS_DATA_DIR")
    path = Path(root or "") / "alpaca_eval" / "ae1_gpt4_pairs.train.jsonl.gz"
    if root and path.is_file():
        with gzip.open(path, "rt") as handle:
            rows = [json.loads(line) for _, line in zip(range(4 * n), handle)]
        rows = python_random(seed).sample(rows, n)
        return [r["instruction"] for r in rows], [r["output_2"] for r in rows]
    rng = python_random(seed)
    words = "the of a reward model ensemble picks better outputs when members disagree less".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 400))) for _ in range(n)]
    return [f"Question {i}: explain something." for i in range(n)], texts


@torch.no_grad()
def previous_path(reward: EnsembleReward, prompts: list[str], texts: list[str]) -> torch.Tensor:
    """EnsembleReward.member_scores as it was before batching: each response encoded on its own, each batch
    moved back to the CPU, fp32 forwards."""
    seqs = [reward.encoder.encode(p, r) for p, r in zip(prompts, texts)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    device = next(reward.ensemble.parameters()).device
    out = torch.empty(reward.k, len(seqs))
    for start in range(0, len(order), reward.batch_size):
        rows = order[start: start + reward.batch_size]
        batch = pad_batch([seqs[i] for i in rows], reward.pad_id)
        out[:, rows] = reward.ensemble(**{k: v.to(device) for k, v in batch.items()}).float().cpu()
    return out


@torch.no_grad()
def bare_forward(reward: EnsembleReward, batches: list[dict[str, torch.Tensor]]) -> None:
    device = next(reward.ensemble.parameters()).device
    with reward._autocast(device):
        outs = [reward.ensemble(**batch) for batch in batches]
    if device.type == "cuda":
        torch.cuda.synchronize()
    del outs


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--responses", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=1, help="members of a linear ensemble (1: one reward model)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ensemble = build_ensemble(EnsembleConfig(kind="linear", k=args.k, backbone=args.model,
                                             max_length=args.max_length)).to(device).eval()
    # untrained, so without standardisation statistics: only the time of scoring is measured
    reward = EnsembleReward(ensemble, load_tokenizer(args.model), batch_size=args.batch_size, allow_unstandardised=True)
    prompts, texts = responses(args.responses)
    seqs = reward.encoder.encode_batch(prompts, texts)
    assert seqs == [reward.encoder.encode(p, r) for p, r in zip(prompts, texts)], "batched encoding differs"
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = [{k: v.to(device) for k, v in pad_batch([seqs[i] for i in order[s: s + args.batch_size]],
                                                      reward.pad_id).items()}
               for s in range(0, len(order), args.batch_size)]
    tokens = sum(map(len, seqs))
    padded = sum(b["input_ids"].numel() for b in batches)
    paths = {"bare forward": lambda: bare_forward(reward, batches),
             "EnsembleReward.member_scores": lambda: reward.member_scores(prompts, texts),
             "previous path": lambda: previous_path(reward, prompts, texts)}
    paths["EnsembleReward.member_scores"]()  # warm-up: kernels, tokenizer caches
    best = {name: min(timed(fn) for _ in range(args.repeats)) for name, fn in paths.items()}
    encode_s = min(timed(lambda: reward.encoder.encode_batch(prompts, texts)) for _ in range(args.repeats))
    encode_old_s = min(timed(lambda: [reward.encoder.encode(p, r) for p, r in zip(prompts, texts)])
                       for _ in range(args.repeats))
    rate = {name: tokens / seconds for name, seconds in best.items()}
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": args.model,
              "responses": args.responses, "max_length": args.max_length, "batch_size": args.batch_size,
              "k": args.k, "real_tokens": tokens, "padding_fraction": 1 - tokens / padded,
              "precision": "bf16 autocast" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32",
              "seconds": best, "tokens_per_s": rate, "encode_batch_s": encode_s, "encode_one_by_one_s": encode_old_s,
              "ratio_to_bare_forward": rate["EnsembleReward.member_scores"] / rate["bare forward"],
              "ratio_to_previous_path": rate["EnsembleReward.member_scores"] / rate["previous path"]}
    lines = [f"{result['device']}, {args.model}, {args.responses} responses at <= {args.max_length} tokens, batch "
             f"{args.batch_size}, {result['precision']}; {tokens} real tokens, "
             f"padding {result['padding_fraction']:.1%}"]
    lines += [f"  {name:<30} {seconds:8.2f} s  {rate[name]:9.0f} tokens/s" for name, seconds in best.items()]
    lines += [f"  encoding alone: batched {encode_s:.2f} s, one at a time {encode_old_s:.2f} s",
              f"  member_scores / bare forward: {result['ratio_to_bare_forward']:.2f} (target on a GPU: >= 0.7)",
              f"  member_scores / previous path: {result['ratio_to_previous_path']:.2f} (target: >= 1, no slower)"]
    save_results("scoring_throughput", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
