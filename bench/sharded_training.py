"""One reward-model training in one process and sharded over N FSDP2 ranks (rmens.training.launcher), side by
side on the same pairs: wall time, the loss curves' largest difference, the trained weights and Adam state each
process held (measured from its tensors: a rank holds its shards), and each process's peak resident memory.

    python bench/sharded_training.py                      # SmolLM2-135M, linear k=3, 2 ranks
    python bench/sharded_training.py --backbone tiny-random-llama --steps 4

On a machine without GPUs the ranks are CPU processes under gloo sharing its cores; what sharding saves there is
the per-rank state, not time, and each rank still loads the whole backbone before sharding it, so its resident
peak is not halved (on GPUs the shards are what reaches each device). Results: bench/out/sharded_training.json
and .txt.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from results import save_results

from rmens.data.loaders import synthetic_pairs
from rmens.io import write_jsonl
from rmens.models.config import EnsembleConfig
from rmens.training.config import TrainConfig
from rmens.training.launcher import train_on_devices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--kind", default="linear", choices=["linear", "full", "lora"])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rmens-bench-shard-"))
    pairs = synthetic_pairs(64, seed=0)
    write_jsonl(tmp / "train.jsonl", (p.to_dict() for p in pairs[:48]))
    write_jsonl(tmp / "val.jsonl", (p.to_dict() for p in pairs[48:]))
    ens = EnsembleConfig(kind=args.kind, k=args.k, backbone=args.backbone, max_length=args.max_length)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, eval_batch_size=args.batch_size, lr=1e-5,
                      precision="fp32", progress=False, calibration_pairs=16)
    from rmens.models.backbone import resolve_model

    resolve_model(args.backbone)  # a converted model (SmolLM2 from its GGUF) is built once, outside the timing
    runs = {}
    for devices in (1, args.ranks):
        start = time.perf_counter()
        result = train_on_devices(devices, ens, cfg, tmp / "train.jsonl", tmp / "val.jsonl",
                                  tmp / f"d{devices}" / "ensemble")
        wall = time.perf_counter() - start
        peaks = [r["peak_mib"] for r in result.ranks] if result.ranks else \
            [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
        runs[devices] = {"wall_s": wall, "peak_rss_mib": peaks, "accuracy": result.metrics["accuracy"],
                         "state_mib": sum(s.state_mib for s in result.stages.values()),
                         "loss": [p["train/loss"] for s in result.stages.values() for p in s.history]}
    one, many = runs[1], runs[args.ranks]
    diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(one["loss"], many["loss"]))
    result = {"backbone": args.backbone, "kind": args.kind, "k": args.k, "ranks": args.ranks, "steps": args.steps,
              "batch_size": args.batch_size, "max_length": args.max_length, "runs": runs,
              "loss_max_rel_diff": diff}
    lines = [f"{args.kind} k={args.k} on {args.backbone}, {args.steps} steps of {args.batch_size} pairs "
             f"({args.max_length} tokens), fp32 on CPU",
             f"{'':22}{'1 process':>14}{f'{args.ranks} FSDP2 ranks':>18}{'ratio':>8}",
             f"{'wall time (s)':22}{one['wall_s']:14.1f}{many['wall_s']:18.1f}{many['wall_s'] / one['wall_s']:8.2f}",
             f"{'state / process (MiB)':22}{one['state_mib']:14.1f}{many['state_mib']:18.1f}"
             f"{many['state_mib'] / one['state_mib']:8.2f}",
             f"{'peak RSS / process':22}{max(one['peak_rss_mib']):14.0f}{max(many['peak_rss_mib']):18.0f}"
             f"{max(many['peak_rss_mib']) / max(one['peak_rss_mib']):8.2f}",
             f"loss curves: largest relative difference {diff:.1e}; val accuracy {one['accuracy']:.3f} vs "
             f"{many['accuracy']:.3f}",
             "state: trained weights and Adam moments held at the end (rank 0's shards for the ranks)"]
    save_results("sharded_training", result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
