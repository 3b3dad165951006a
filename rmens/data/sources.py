"""The files and folders outside the store that a config section makes a step read: data files, prompt
files, the data folder's files, local model folders. Steps declare them (rmens.steps.step's `reads`), so
that a step's key holds their content (rmens.steps.content) and a file changed in place recomputes
exactly the steps that read it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rmens.data.loaders import alpaca_eval_folder
from rmens.data.schema import DataError


def alpaca_eval_paths(path: str | None) -> list[Path]:
    """The AlpacaEval folder a section reads (none when no folder is configured: the checks before any
    work say so)."""
    try:
        return [alpaca_eval_folder(path)]
    except DataError:
        return []


def model_paths(*names: str | None) -> list[Path]:
    """Local model folders among model names (aliases that rmens builds and Hub ids are not files here: an
    alias is keyed by its build version, a Hub id by its name)."""
    return [Path(name).expanduser() for name in names if name and Path(name).expanduser().exists()]


def engine_paths(generation: Any) -> list[Path]:
    """The vLLM worker script a GenerationConfig with backend "vllm" runs (run by path, never imported: read, so
    that its source is in the key of the steps that sample through it)."""
    from rmens.generation_config import VLLM_WORKER

    return [VLLM_WORKER] if generation.backend == "vllm" else []


def paths_read(section: Any) -> list[Path]:
    """Data and prompt files a DataConfig or PromptsConfig reads (None: nothing). The pipeline's evaluation and
    gold read others (rmens.pipeline.evaluate.eval_paths, rmens.pipeline.gold.gold_paths)."""
    from rmens.data.config import DataConfig, PromptsConfig

    if section is None:
        return []
    if isinstance(section, DataConfig):
        if section.source == "alpaca_eval":
            return alpaca_eval_paths(section.path)
        return [Path(section.path)] if section.source in ("jsonl", "hf") and section.path and (
            section.source == "jsonl" or Path(section.path).exists()) else []
    if isinstance(section, PromptsConfig):
        if section.source == "file":
            return [Path(section.path)]
        return alpaca_eval_paths(section.path) if section.source == "alpaca_eval" else []
    raise TypeError(f"no data files known for {type(section).__name__}")
