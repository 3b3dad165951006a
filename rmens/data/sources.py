"""The files and folders outside the store that a config section makes a step read: data files, prompt
files, the data folder's files, local model folders. Steps declare them (rmens.steps.step's `reads`), so
that a step's key holds their content (rmens.steps.content) and a file changed in place recomputes
exactly the steps that read it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rmens.data.loaders import alpaca_eval_folder, data_root
from rmens.data.schema import DataError


def _alpaca_eval(path: str | None) -> list[Path]:
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


def paths_read(section: Any) -> list[Path]:
    """Data and prompt files a DataConfig, PromptsConfig, EvalConfig or JudgeConfig reads (None: nothing)."""
    from rmens.config import DataConfig, EvalConfig, JudgeConfig, PromptsConfig

    if section is None:
        return []
    if isinstance(section, DataConfig):
        if section.source == "alpaca_eval":
            return _alpaca_eval(section.path)
        return [Path(section.path)] if section.source in ("jsonl", "hf") and section.path and (
            section.source == "jsonl" or Path(section.path).exists()) else []
    if isinstance(section, PromptsConfig):
        if section.source == "file":
            return [Path(section.path)]
        return _alpaca_eval(section.path) if section.source == "alpaca_eval" else []
    if isinstance(section, EvalConfig):
        mt_bench = [Path(section.mt_bench_path)] if section.mt_bench_path else (
            [data_root() / "mt_bench"] if data_root() is not None and section.mt_bench else [])
        return (_alpaca_eval(None) if section.source == "alpaca_eval" else []) + mt_bench
    if isinstance(section, JudgeConfig):
        if section.kind == "local_llm":
            prompts = [data_root() / "mt_bench" / "judge_prompts.jsonl"] if data_root() is not None else []
            return prompts + model_paths(section.model)
        return model_paths(section.model) if section.kind == "hf_reward_model" else []
    raise TypeError(f"no data files known for {type(section).__name__}")
