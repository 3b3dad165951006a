"""Which verdicts train and which evaluate: evaluation instructions are never trained on.

- Evaluation pools: every instruction of `eval_data` (a folder of AE-format files, such as held-back
  test-split annotations), or, when it is not given, a share of the training folder's instructions
  held out by a hash of their text. Those instructions are removed from every training set.
- The remaining training instructions are split by instruction again: the larger share trains the gold
  judge (AE1 + AE2 verdicts), the smaller, disjoint share trains the proxies and gives PPO its prompts.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from rmens.data.loaders import AE_FILES, alpaca_eval_folder, data_root, load_alpaca_eval_pairs, subsample
from rmens.data.schema import DataError, PreferencePair, validate_pairs
from rmens.data.splits import unit_hash
from rmens.evaluation.logged_bon import (
    JUDGE_FILES,
    Pool,
    judge_files,
    load_pools,
    read_pools,
    subsample_pools,
    write_pools,
)
from rmens.experiment.config import SplitConfig
from rmens.experiment.plan import GOLD_PAIRS, PROXY_PAIRS
from rmens.io import atomic_write_text, write_jsonl

EVAL_SALT, PROXY_SALT = "rmens-eval-pools", "rmens-proxy-share"


def pools_file(judge: str) -> str:
    return f"pools_{judge}.jsonl"


def check_inputs(cfg: SplitConfig) -> None:
    """Fail in one line, before any work, when a data folder or its annotation files are missing."""
    if cfg.data_dir is None and data_root() is None:
        raise FileNotFoundError("the experiment trains on AlpacaEval verdicts: set RMENS_DATA_DIR to the data folder "
                                "(with alpaca_eval/ inside) or pass --data-dir")
    train_dir = alpaca_eval_folder(cfg.data_dir)
    missing = [name for name in AE_FILES.values() if not (train_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"training folder {train_dir} lacks {', '.join(missing)}")
    eval_dir = Path(cfg.eval_data) if cfg.eval_data else train_dir
    for judge in cfg.pools.judges:
        if not judge_files(eval_dir, judge):
            raise FileNotFoundError(f"evaluation folder {eval_dir} has no {JUDGE_FILES[judge]}*.jsonl[.gz] files "
                                    f"for judge set {judge} (pools.judges)")


def prepare_data(cfg: SplitConfig, folder: str | Path) -> dict:
    """Write the evaluation pools, the gold and proxy training pairs and the PPO prompt sets to `folder`."""
    folder = Path(folder)
    train_dir = alpaca_eval_folder(cfg.data_dir)
    eval_dir = Path(cfg.eval_data) if cfg.eval_data else train_dir
    held_out_by_hash = eval_dir.resolve() == train_dir.resolve()

    def held_out(instruction: str) -> bool:
        return held_out_by_hash and unit_hash(instruction, f"{EVAL_SALT}-{cfg.seed}") < cfg.eval_fraction

    stats: Counter = Counter()
    pools: dict[str, list[Pool]] = {}
    eval_instructions: set[str] = set()
    for judge in cfg.pools.judges:
        found = load_pools(eval_dir, judge, include_generators=cfg.pools.include_generators,
                           exclude_generators=cfg.pools.exclude_generators, stats=stats)
        if held_out_by_hash:
            found = [pool for pool in found if held_out(pool.instruction)]
        eval_instructions |= {pool.instruction for pool in found}
        pools[judge] = subsample_pools(found, max_instructions=cfg.pools.max_instructions,
                                       pool_size=cfg.pools.pool_size, min_size=cfg.pools.max_n, seed=cfg.seed,
                                       stats=stats)
        if not pools[judge]:
            raise DataError(f"{judge}: no evaluation pool has {cfg.pools.max_n} outputs (pools.max_n) in {eval_dir}")

    # Every evaluation instruction leaves the training data, whichever folder the pools came from.
    every_pair = load_alpaca_eval_pairs(train_dir, "both", soft_labels=True, stats=stats)
    train_pairs = [p for p in every_pair if p.prompt not in eval_instructions and not held_out(p.prompt)]
    stats["pairs_of_evaluation_instructions_removed"] = len(every_pair) - len(train_pairs)
    training = sorted({p.prompt for p in train_pairs})
    if not training:
        raise DataError(f"no training instructions left in {train_dir} once the evaluation instructions are removed")
    proxy_share = {i for i in training if unit_hash(i, f"{PROXY_SALT}-{cfg.seed}") < cfg.proxy.fraction}

    def share(subset: str, proxies: bool) -> list[PreferencePair]:
        return [p for p in train_pairs if (p.prompt in proxy_share) == proxies
                and subset in ("both", p.source.get("subset"))]

    gold_pairs = validate_pairs(subsample(share(cfg.gold.subset, False), cfg.gold.max_pairs, cfg.seed),
                                "gold judge training pairs")
    proxy_pairs = validate_pairs(subsample(share(cfg.proxy.subset, True), cfg.proxy.max_pairs, cfg.seed + 1),
                                 "proxy training pairs")
    leaked = ({p.prompt for p in gold_pairs} | {p.prompt for p in proxy_pairs}) & eval_instructions
    if leaked:  # impossible by construction; checked because every result below rests on it
        raise AssertionError(f"{len(leaked)} evaluation instructions are in a training set")

    ppo_prompts = sorted(proxy_share)
    if cfg.ppo_prompts is not None and len(ppo_prompts) > cfg.ppo_prompts:
        ppo_prompts = sorted(random.Random(cfg.seed).sample(ppo_prompts, cfg.ppo_prompts))
    pool_instructions = sorted({pool.instruction for judge_pools in pools.values() for pool in judge_pools})
    eval_prompts = sorted(random.Random(cfg.seed + 2).sample(pool_instructions,
                                                             min(cfg.eval_prompts, len(pool_instructions))))

    folder.mkdir(parents=True, exist_ok=True)
    for judge, judge_pools in pools.items():
        write_pools(folder / pools_file(judge), judge_pools)
    write_jsonl(folder / GOLD_PAIRS, (p.to_dict() for p in gold_pairs))
    write_jsonl(folder / PROXY_PAIRS, (p.to_dict() for p in proxy_pairs))
    summary = {
        "eval_source": str(eval_dir), "train_source": str(train_dir),
        "evaluation_instructions": len(eval_instructions), "training_instructions": len(training),
        "gold_instructions": len(training) - len(proxy_share), "proxy_instructions": len(proxy_share),
        "gold_pairs": len(gold_pairs), "proxy_pairs": len(proxy_pairs),
        "ppo_prompts": len(ppo_prompts), "eval_prompts": len(eval_prompts),
        **{f"pools_{judge}": len(p) for judge, p in pools.items()},
        **{f"pool_outputs_{judge}": sum(map(len, p)) for judge, p in pools.items()},
        "evaluation_instructions_in_training": len(leaked),
    }
    atomic_write_text(folder / "prompts.json", json.dumps({"ppo": ppo_prompts, "eval": eval_prompts}, indent=2))
    atomic_write_text(folder / "split.json", json.dumps({**summary, "filtered": dict(stats)}, indent=2))
    return summary


def read_split_pools(folder: str | Path, judge: str) -> list[Pool]:
    return read_pools(Path(folder) / pools_file(judge))


def read_prompts(folder: str | Path) -> dict[str, list[str]]:
    return json.loads((Path(folder) / "prompts.json").read_text())
