"""Prompt sets for sampling, Best-of-n, PPO and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from rmens.data.loaders import alpaca_eval_folder, synthetic_pairs
from rmens.data.schema import DataError
from rmens.io import iter_jsonl
from rmens.seeding import python_random


def alpaca_eval_instructions(split: str | None = None, folder: str | Path | None = None) -> list[dict]:
    """AlpacaEval's 805 instructions (`instruction`, `dataset`, `split`), optionally one split."""
    path = Path(alpaca_eval_folder(str(folder) if folder else None)) / "instructions.jsonl"
    rows = [record for _, record in iter_jsonl(path)]
    if split is not None:
        if split not in {"train", "test"}:
            raise ValueError(f"AlpacaEval split must be 'train' or 'test', got {split!r}")
        rows = [r for r in rows if r["split"] == split]
    return rows


def reference_outputs(name: str = "gpt4_1106_preview", folder: str | Path | None = None) -> dict[str, str]:
    """instruction -> reference output, from `<name>_model_outputs.json` in the AlpacaEval folder."""
    path = Path(alpaca_eval_folder(str(folder) if folder else None)) / f"{name}_model_outputs.json"
    if not path.is_file():
        raise FileNotFoundError(f"no reference outputs {path}")
    return {row["instruction"]: row["output"] for row in json.loads(path.read_text())}


def load_prompt_file(path: str | Path) -> list[str]:
    """JSONL of {"prompt": ...} or {"instruction": ...}, or a plain text file with one prompt per line."""
    path = Path(path)
    if path.suffix in (".jsonl", ".gz"):
        prompts = []
        for lineno, record in iter_jsonl(path):
            text = record.get("prompt", record.get("instruction")) if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{lineno}: needs a non-empty 'prompt' or 'instruction'")
            prompts.append(text)
    else:
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def synthetic_prompts(n: int = 32, seed: int = 0) -> list[str]:
    return [p.prompt for p in synthetic_pairs(n, seed)]


def load_prompts(cfg) -> list[str]:
    """The prompts a PromptsConfig names, subsampled (seeded) to max_prompts."""
    if cfg.source == "synthetic":
        prompts = synthetic_prompts(cfg.max_prompts or 32, cfg.seed)
    elif cfg.source == "file":
        prompts = load_prompt_file(cfg.path)
    else:
        prompts = [row["instruction"] for row in alpaca_eval_instructions(cfg.split, cfg.path)]
    if cfg.max_prompts is not None and cfg.max_prompts < len(prompts):
        keep = sorted(python_random(cfg.seed).sample(range(len(prompts)), cfg.max_prompts))
        prompts = [prompts[i] for i in keep]
    return prompts
