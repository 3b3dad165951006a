"""Which verdicts train and which evaluate: evaluation instructions are never trained on.

- Evaluation instructions: every instruction of `eval_data` (a folder of AE-format files, such as
  held-back test-split annotations, whatever the generators or the pool sizes), or, when it is not
  given, a share of the training folder's instructions held out by a hash of their text. They are
  removed from every training set, compared with surrounding whitespace stripped.
- `split_pairs` (the training side): the remaining instructions are split again by a hash of their
  text: the larger share trains the gold judge, the smaller, disjoint share trains the proxies and gives
  PPO its prompts.
- `build_pools` (the evaluation side): one pool of logged outputs per evaluation instruction and judge
  set, and the held-out instructions PPO checkpoints answer.

The two sides are separate steps, so that changing the pools never retrains a reward model.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from rmens.data.loaders import (
    AE_FILES,
    JUDGE_FILES,
    alpaca_eval_folder,
    data_root,
    judge_files,
    load_alpaca_eval_pairs,
    subsample,
)
from rmens.data.schema import DataError, PreferencePair, validate_pairs
from rmens.data.splits import unit_hash
from rmens.evaluation.pools import Pool, load_pools, read_pools, subsample_pools, write_pools
from rmens.experiment.config import DataSource, PoolConfig, SplitConfig
from rmens.experiment.plan import GOLD_PAIRS, PROXY_PAIRS
from rmens.io import iter_jsonl, write_json, write_jsonl

EVAL_SALT, PROXY_SALT = "rmens-eval-pools", "rmens-proxy-share"


def pools_file(judge: str) -> str:
    return f"pools_{judge}.jsonl"


def folders(source: DataSource) -> tuple[Path, Path, bool]:
    """(training folder, evaluation folder, whether evaluation instructions are held out by hash)."""
    train_dir = alpaca_eval_folder(source.data_dir)
    eval_dir = Path(source.eval_data) if source.eval_data else train_dir
    return train_dir, eval_dir, eval_dir.resolve() == train_dir.resolve()


def check_inputs(source: DataSource, judges: list[str]) -> None:
    """Fail in one line, before any work, when a data folder or its annotation files are missing."""
    if source.data_dir is None and data_root() is None:
        raise FileNotFoundError("the experiment trains on AlpacaEval verdicts: set RMENS_DATA_DIR to the data folder "
                                "(with alpaca_eval/ inside) or pass --data-dir")
    train_dir, eval_dir, _ = folders(source)
    missing = [name for name in AE_FILES.values() if not (train_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"training folder {train_dir} lacks {', '.join(missing)}")
    for judge in judges:
        if not judge_files(eval_dir, judge):
            raise FileNotFoundError(f"evaluation folder {eval_dir} has no {JUDGE_FILES[judge]}*.jsonl[.gz] files "
                                    f"for judge set {judge} (pools.judges)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprints(source: DataSource) -> dict[str, dict[str, str]]:
    """The content hash of every file each side reads, so that new files mean new results (and a record
    of exactly which data a run used)."""
    train_dir, eval_dir, _ = folders(source)
    evaluation = [p for judge in JUDGE_FILES for p in judge_files(eval_dir, judge)]
    training = [train_dir / name for name in AE_FILES.values()]
    return {"training": {str(p): _sha256(p) for p in training},
            "evaluation": {str(p): _sha256(p) for p in evaluation}}


def instructions_in(folder: Path) -> set[str]:
    """Every instruction (stripped) of the annotation files in `folder`."""
    found = {str(record.get("instruction", "")).strip() for judge in JUDGE_FILES
             for path in judge_files(folder, judge) for _, record in iter_jsonl(path) if isinstance(record, dict)}
    return found - {""}


def held_out(instruction: str, source: DataSource) -> bool:
    return unit_hash(instruction.strip(), f"{EVAL_SALT}-{source.seed}") < source.eval_fraction


def split_pairs(source: DataSource, split: SplitConfig, folder: str | Path,
                sources: dict[str, str] | None = None) -> dict:
    """The gold judge's and the proxies' training pairs and PPO's prompts, none from an evaluation
    instruction: gold_pairs.jsonl, proxy_pairs.jsonl, ppo_prompts.json, split.json."""
    folder = Path(folder)
    train_dir, eval_dir, by_hash = folders(source)
    stats: Counter = Counter()
    every_pair = load_alpaca_eval_pairs(train_dir, "both", soft_labels=True, stats=stats)
    excluded = ({p.prompt.strip() for p in every_pair if held_out(p.prompt, source)} if by_hash
                else instructions_in(eval_dir))
    train_pairs = [p for p in every_pair if p.prompt.strip() not in excluded]
    stats["pairs_of_evaluation_instructions_removed"] = len(every_pair) - len(train_pairs)
    training = sorted({p.prompt for p in train_pairs})
    if not training:
        raise DataError(f"no training instructions left in {train_dir} once the evaluation instructions are removed")
    proxy_share = {i for i in training if unit_hash(i, f"{PROXY_SALT}-{source.seed}") < split.proxy.fraction}

    def share(subset: str, proxies: bool) -> list[PreferencePair]:
        return [p for p in train_pairs if (p.prompt in proxy_share) == proxies
                and subset in ("both", p.source.get("subset"))]

    gold_pairs = validate_pairs(subsample(share(split.gold.subset, False), split.gold.max_pairs, source.seed),
                                "gold judge training pairs")
    proxy_pairs = validate_pairs(subsample(share(split.proxy.subset, True), split.proxy.max_pairs, source.seed + 1),
                                 "proxy training pairs")
    ppo_prompts = sorted(proxy_share)
    if split.ppo_prompts is not None and len(ppo_prompts) > split.ppo_prompts:
        ppo_prompts = sorted(random.Random(source.seed).sample(ppo_prompts, split.ppo_prompts))
    used = {p.prompt.strip() for p in gold_pairs + proxy_pairs} | {p.strip() for p in ppo_prompts}
    if used & excluded:  # impossible by construction; checked because every result rests on it
        raise AssertionError(f"{len(used & excluded)} evaluation instructions are in a training set")

    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / GOLD_PAIRS, (p.to_dict() for p in gold_pairs))
    write_jsonl(folder / PROXY_PAIRS, (p.to_dict() for p in proxy_pairs))
    write_json(folder / "ppo_prompts.json", ppo_prompts)
    summary = {"train_source": str(train_dir), "eval_source": str(eval_dir), "held_out_by_hash": by_hash,
               "evaluation_instructions": len(excluded), "training_instructions": len(training),
               "gold_instructions": len(training) - len(proxy_share), "proxy_instructions": len(proxy_share),
               "gold_pairs": len(gold_pairs), "proxy_pairs": len(proxy_pairs), "ppo_prompts": len(ppo_prompts),
               "evaluation_instructions_in_training": 0}
    write_json(folder / "split.json", {**summary, "filtered": dict(stats), "sources": sources or {}})
    return summary


def build_pools(source: DataSource, pools: PoolConfig, folder: str | Path,
                sources: dict[str, str] | None = None) -> dict:
    """One pool of logged outputs per evaluation instruction and judge set (pools_<judge>.jsonl), and the
    instructions PPO checkpoints answer (eval_prompts.json); pools.json records the counts."""
    folder = Path(folder)
    _, eval_dir, by_hash = folders(source)
    stats: Counter = Counter()
    chosen: dict[str, list[Pool]] = {}
    for judge in pools.judges:
        found = load_pools(eval_dir, judge, include_generators=pools.include_generators,
                           exclude_generators=pools.exclude_generators, stats=stats)
        if by_hash:
            found = [pool for pool in found if held_out(pool.instruction, source)]
        chosen[judge] = subsample_pools(found, max_instructions=pools.max_instructions, pool_size=pools.pool_size,
                                        min_size=pools.max_n, seed=source.seed, stats=stats)
        if not chosen[judge]:
            raise DataError(f"{judge}: no evaluation pool has {pools.max_n} outputs (pools.max_n) in {eval_dir}")
    instructions = sorted({pool.instruction for judge_pools in chosen.values() for pool in judge_pools})
    eval_prompts = sorted(random.Random(source.seed + 2).sample(instructions, min(pools.eval_prompts,
                                                                                 len(instructions))))
    folder.mkdir(parents=True, exist_ok=True)
    for judge, judge_pools in chosen.items():
        write_pools(folder / pools_file(judge), judge_pools)
    write_json(folder / "eval_prompts.json", eval_prompts)
    summary = {"eval_source": str(eval_dir), "eval_prompts": len(eval_prompts),
               **{f"pools_{judge}": len(p) for judge, p in chosen.items()},
               **{f"pool_outputs_{judge}": sum(map(len, p)) for judge, p in chosen.items()}}
    write_json(folder / "pools.json", {**summary, "filtered": dict(stats), "sources": sources or {}})
    return summary


def read_split_pools(folder: str | Path, judge: str) -> list[Pool]:
    return read_pools(Path(folder) / pools_file(judge))


def read_prompts(folder: str | Path, name: str) -> list[str]:
    """'ppo_prompts.json' of the pairs step or 'eval_prompts.json' of the pools step."""
    return json.loads((Path(folder) / name).read_text())
