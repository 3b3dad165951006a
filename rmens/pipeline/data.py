"""Pipeline steps that make the inputs available: every model the run needs (converted once), and the
preference pairs, loaded, validated, split and (optionally) corrupted, as JSONL."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rmens.data.config import DataConfig
from rmens.data.schema import PreferencePair
from rmens.data.sources import model_paths, paths_read
from rmens.io import write_json, write_jsonl
from rmens.steps import Output, step


@step("prepare_models", files={"models": "models.json"}, reads=lambda names, **_: model_paths(*names))
def prepare_models(folder: Path, *, names: list[str]) -> dict:
    """Resolve every model name to a local folder (SmolLM2 is converted from its GGUF file once)."""
    from rmens.models.backbone import resolve_model

    resolved = {name: resolve_model(name) for name in sorted(set(names))}
    write_json(folder / "models.json", resolved)
    return {"models": len(resolved)}


@step("prepare_data", files={"train": "train.jsonl", "val": "val.jsonl"}, reads=lambda data, **_: paths_read(data))
def prepare_data(folder: Path, *, data: DataConfig) -> dict:
    from rmens.data import prepare_pairs

    stats: Counter = Counter()
    train, val = prepare_pairs(data, stats)
    write_jsonl(folder / "train.jsonl", (p.to_dict() for p in train))
    write_jsonl(folder / "val.jsonl", (p.to_dict() for p in val))
    write_json(folder / "stats.json", dict(stats))
    return {"n_train": len(train), "n_val": len(val),
            "flipped": sum(bool(p.source.get("label_flipped")) for p in train)}


def read_pairs(data: Output, split: str) -> list[PreferencePair]:
    """The prepared pairs of `split` ('train' or 'val')."""
    from rmens.data.loaders import load_jsonl_pairs

    return load_jsonl_pairs(data.require().file(split))
