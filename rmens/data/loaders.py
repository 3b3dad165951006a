"""Loaders that turn preference data in its original formats into PreferencePairs.

Formats: JSONL files of prompt/chosen/rejected, the AlpacaEval annotation files (local folder), Hugging
Face dataset ids (for users with a network), and a small synthetic set for smoke runs and tests.
Loaders of curated user data are strict (the first bad record is an error naming its line); the
AlpacaEval loader drops the known-degenerate records of that corpus (self-pairs, empty outputs, the
adversarial generators) and counts what it dropped and why, but a malformed record (a field missing or
not text) is an error there too.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from rmens.data.config import DataConfig
from rmens.data.schema import DataError, PreferencePair, validate_pair, validate_pairs
from rmens.io import iter_jsonl
from rmens.seeding import python_random

log = logging.getLogger(__name__)

AE_FILES = {
    "ae1": "ae1_gpt4_pairs.train.jsonl.gz",
    "ae2": "ae2_gpt4turbo_pairs.train.jsonl.gz",
}
# Annotation files of a judge set, by file-name prefix (`<prefix>*.jsonl[.gz]`: train, test or other splits).
JUDGE_FILES = {"ae1": "ae1_gpt4_pairs", "ae2": "ae2_gpt4turbo_pairs"}


def judge_files(folder: str | Path, judge: str) -> list[Path]:
    """The annotation files of one judge set in `folder` (e.g. ae1_gpt4_pairs.test.jsonl.gz)."""
    if judge not in JUDGE_FILES:
        raise ValueError(f"unknown judge set {judge!r}; choose from {sorted(JUDGE_FILES)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"annotation folder not found: {folder}")
    prefix = JUDGE_FILES[judge]
    return sorted(p for p in folder.iterdir() if p.name.startswith(prefix) and p.name.endswith((".jsonl", ".jsonl.gz")))


def data_root() -> Path | None:
    """The offline data folder: $RMENS_DATA_DIR, or None when unset."""
    value = os.environ.get("RMENS_DATA_DIR")
    return Path(value).expanduser().resolve() if value else None


def load_jsonl_pairs(path: str | Path) -> list[PreferencePair]:
    """Read prompt/chosen/rejected[/weight/source] records; the first bad record is an error."""
    pairs = [validate_pair(record, f"{path}:{lineno}") for lineno, record in iter_jsonl(path)]
    return validate_pairs(pairs, str(path))


def preference_probability(preference: Any, what: str) -> float:
    """AlpacaEval/AlpacaFarm's `preference` -> P(output_2 is preferred): 1 -> 0, 2 -> 1, a draw (0 or 1.5)
    -> 0.5, AE2's probability-weighted value in [1, 2] -> value - 1. `what` names the field in errors."""
    if isinstance(preference, bool) or not isinstance(preference, (int, float)) or not math.isfinite(preference):
        raise DataError(f"{what} must be a number, got {preference!r}")
    if preference == 0:
        return 0.5
    if not 1.0 <= preference <= 2.0:
        raise DataError(f"{what} {preference!r} is outside the allowed values (1, 2, 0 or 1.5, or [1, 2])")
    return float(preference) - 1.0


def preference_to_pair(
    prompt: str,
    output_1: str,
    output_2: str,
    preference: Any,
    *,
    where: str,
    draws: str = "drop",
    soft_labels: bool = False,
    source: dict[str, Any] | None = None,
) -> PreferencePair | None:
    """Map an AlpacaEval/AlpacaFarm judgement to a pair, or None for a draw that is dropped.

    `preference` is 1 (output_1 preferred), 2 (output_2 preferred), 0 or 1.5 (draw), or for AE2 a
    probability-weighted value in [1, 2] (1 + P(output_2 preferred)).
    """
    p_second = preference_probability(preference, f"{where}: preference")
    if p_second == 0.5:
        if draws == "drop":
            return None
        chosen, rejected, weight = output_2, output_1, 0.5
    elif p_second > 0.5:
        chosen, rejected, weight = output_2, output_1, p_second
    else:
        chosen, rejected, weight = output_1, output_2, 1.0 - p_second
    if not soft_labels and weight != 0.5:
        weight = 1.0
    record = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "weight": weight, "source": source or {}}
    return validate_pair(record, where)


def load_alpaca_eval_pairs(
    folder: str | Path,
    subset: str = "ae1",
    *,
    draws: str = "drop",
    soft_labels: bool = False,
    include_generators: list[str] | None = None,
    exclude_generators: list[str] | tuple[str, ...] = ("example", "gpt4_gamed"),
    stats: Counter | None = None,
) -> list[PreferencePair]:
    """Load AlpacaEval judgements (AE1: GPT-4, AE2: GPT-4-turbo) from the offline data folder.

    Each record compares a reference output (output_1) with another generator's output (output_2).
    A generator filter applies to the non-reference generator.
    """
    folder = Path(folder)
    names = list(AE_FILES) if subset == "both" else [subset]
    stats = stats if stats is not None else Counter()
    include = set(include_generators) if include_generators else None
    exclude = set(exclude_generators)
    pairs: list[PreferencePair] = []
    for name in names:
        if name not in AE_FILES:
            raise ValueError(f"unknown AlpacaEval subset {name!r}; choose from {sorted(AE_FILES)} or 'both'")
        path = folder / AE_FILES[name]
        for lineno, rec in iter_jsonl(path):
            where = f"{path}:{lineno}"
            _check_ae_record(rec, where)
            generator = rec.get("generator_2")
            if (include is not None and generator not in include) or generator in exclude:
                stats["filtered_generator"] += 1
                continue
            out1, out2 = rec["output_1"], rec["output_2"]
            if not out1.strip() or not out2.strip():
                stats["empty_output"] += 1
                continue
            if out1 == out2:
                stats["self_pair"] += 1
                continue
            source = {
                "subset": name,
                "dataset": rec.get("dataset"),
                "generator_1": rec.get("generator_1"),
                "generator_2": generator,
                "annotator": rec.get("annotator"),
                "preference": rec.get("preference"),
            }
            pair = preference_to_pair(
                rec["instruction"], out1, out2, rec["preference"],
                where=where, draws=draws, soft_labels=soft_labels, source=source,
            )
            if pair is None:
                stats["draw_dropped"] += 1
                continue
            pairs.append(pair)
            stats["kept"] += 1
    log.info("alpaca_eval %s: %s", subset, dict(stats))
    return validate_pairs(pairs, f"alpaca_eval {subset} in {folder}")


AE_FIELDS = ("instruction", "output_1", "output_2", "preference")


def _check_ae_record(record: Any, where: str) -> None:
    """A malformed AlpacaEval record (not an object, a field missing, an output that is not text) is an
    error naming it: only well-formed degenerate records (empty outputs, self-pairs, draws) are dropped."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an AlpacaEval record (an object), got {type(record).__name__}")
    missing = [name for name in AE_FIELDS if name not in record]
    if missing:
        raise DataError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(name) for name in missing)}")
    for name in ("instruction", "output_1", "output_2"):
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {record[name]!r:.60}")


def _common_prefix_split(chosen: str, rejected: str) -> tuple[str, str, str]:
    """hh-rlhf stores whole conversations; the prompt is everything up to the last assistant turn."""
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker)
    if cut < 0 or chosen[: cut + len(marker)] != rejected[: cut + len(marker)]:
        raise ValueError("conversations do not share a prompt ending in an 'Assistant:' turn")
    cut += len(marker)
    return chosen[:cut], chosen[cut:].strip(), rejected[cut:].strip()


def hf_record_to_pair(record: dict[str, Any], where: str, *, draws: str = "drop") -> PreferencePair | None:
    """Map one row of a common Hugging Face preference dataset layout to a pair."""
    if {"instruction", "output_1", "output_2", "preference"} <= set(record):
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        return preference_to_pair(
            prompt, record["output_1"], record["output_2"], record["preference"], where=where, draws=draws
        )
    if {"prompt", "chosen", "rejected"} <= set(record):
        return validate_pair({k: record[k] for k in ("prompt", "chosen", "rejected")}, where)
    if {"chosen", "rejected"} <= set(record):
        try:
            prompt, chosen, rejected = _common_prefix_split(record["chosen"], record["rejected"])
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
        return validate_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected}, where)
    raise DataError(f"{where}: unrecognised preference layout with columns {sorted(record)}")


def load_hf_pairs(dataset_id: str, split: str = "train", *, draws: str = "drop") -> list[PreferencePair]:
    """Load a Hugging Face preference dataset (needs a network or a populated HF cache).

    Understood layouts: prompt/chosen/rejected; hh-rlhf's chosen/rejected conversations; AlpacaFarm's
    instruction/input/output_1/output_2/preference. `dataset_id` may carry a config after a colon, as in
    `tatsu-lab/alpaca_farm:alpaca_human_preference`.
    """
    import datasets  # imported lazily: heavy, and only this loader needs it

    name, _, config = dataset_id.partition(":")
    rows = datasets.load_dataset(name, config or None, split=split)
    pairs: list[PreferencePair] = []
    for index, record in enumerate(rows):
        pair = hf_record_to_pair(dict(record), f"{dataset_id}[{split}][{index}]", draws=draws)
        if pair is not None:
            pairs.append(pair)
    return validate_pairs(pairs, dataset_id)


_FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum"]
_TASKS = ["Name a fruit that is {}.", "Which fruit is {}?", "Tell me about a {} fruit.", "Suggest a {} snack."]
_COLOURS = ["red", "yellow", "green", "orange", "purple", "sweet", "sour", "small"]


def synthetic_pairs(n: int = 256, seed: int = 0) -> list[PreferencePair]:
    """A small learnable preference set: helpful, polite answers beat curt refusals.

    Used by the smoke preset and the tests; it needs no files and no network.
    """
    rng = python_random(seed)
    pairs = []
    for i in range(n):
        prompt = rng.choice(_TASKS).format(rng.choice(_COLOURS)) + f" (#{i})"
        fruit = rng.choice(_FRUITS)
        chosen = f"Sure! A good choice is the {fruit}. It is tasty and healthy."
        rejected = rng.choice(["No.", "I will not answer.", "Ask someone else.", "..."])
        pairs.append(PreferencePair(prompt, chosen, rejected, 1.0, {"dataset": "synthetic"}))
    return pairs


def subsample(pairs: list[PreferencePair], n: int | None, seed: int) -> list[PreferencePair]:
    """A seeded random subset of n pairs, in their original order (all of them when n is None)."""
    if n is None or n >= len(pairs):
        return pairs
    keep = sorted(python_random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


def load_pairs(cfg: DataConfig, stats: Counter | None = None) -> list[PreferencePair]:
    """Load the pairs a DataConfig names (before splitting and label noise)."""
    if cfg.source == "synthetic":
        return synthetic_pairs(cfg.max_pairs or 256, seed=cfg.seed)
    if cfg.source == "jsonl":
        pairs = load_jsonl_pairs(cfg.path)
    elif cfg.source == "hf":
        pairs = load_hf_pairs(cfg.path, cfg.hf_split, draws=cfg.draws)
    else:
        pairs = load_alpaca_eval_pairs(
            alpaca_eval_folder(cfg.path), cfg.subset, draws=cfg.draws, soft_labels=cfg.soft_labels,
            include_generators=cfg.include_generators, exclude_generators=cfg.exclude_generators, stats=stats,
        )
    return subsample(pairs, cfg.max_pairs, cfg.seed)


def alpaca_eval_folder(path: str | None = None) -> Path:
    """The AlpacaEval data folder: `path`, else $RMENS_DATA_DIR/alpaca_eval."""
    if path:
        return Path(path)
    root = data_root()
    if root is None:
        raise DataError("AlpacaEval data needs a folder: pass data.path or set RMENS_DATA_DIR to the data folder")
    return root / "alpaca_eval"


def check_sources(sections: dict[str, Any]) -> None:
    """Fail in one line, before any model is built or converted, when a configured data source is missing or
    a data or prompt file holds a malformed record:
    `sections` maps a setting's name (data, gold.data, bon_prompts, evaluate) to its Data/Prompts/Eval config."""
    for name, section in sections.items():
        source, path = getattr(section, "source", None), getattr(section, "path", None)
        if source == "alpaca_eval":
            try:
                folder = alpaca_eval_folder(path)
            except DataError as err:
                raise DataError(f"{name}.source=alpaca_eval: {err}") from None
            if not folder.is_dir():
                raise DataError(f"{name}.source=alpaca_eval: no data folder at {folder} (set RMENS_DATA_DIR or "
                                f"{name}.path)")
        elif source in ("jsonl", "file") and path:
            if not Path(path).expanduser().exists():
                raise DataError(f"{name}.path: {path} does not exist")
            # Read through once, so that a malformed record is one line naming it before any server starts or
            # model is built (reading a file of pairs or prompts takes well under a second per 10 MB).
            from rmens.data.prompts import load_prompt_file  # it imports this module

            (load_jsonl_pairs if source == "jsonl" else load_prompt_file)(Path(path).expanduser())
