"""Stage: load, validate, split and (optionally) corrupt preference pairs; write them as JSONL."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import mlflow
import pandas as pd

from rmens.config import DataConfig
from rmens.data.schema import PreferencePair
from rmens.io import write_jsonl
from tasks.runtime.refs import ArtifactRef
from tasks.runtime.stage import run_stage, stage_task
from tasks.runtime.tracking import StageContext


def read_pairs(ref: ArtifactRef, split: str) -> list[PreferencePair]:
    from rmens.data.loaders import load_jsonl_pairs

    return load_jsonl_pairs(ref.require().folder / f"{split}.jsonl")


def _log_dataset(path: Path, pairs: list[PreferencePair], name: str, context: str) -> None:
    frame = pd.DataFrame([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "weight": p.weight}
                          for p in pairs])
    with warnings.catch_warnings():
        # MLflow registers two local-file dataset sources and warns that a path fits both; either is right.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_pandas(frame, source=str(path), name=name)
    mlflow.log_input(dataset, context=context)


@stage_task("prepare_data", timeout_seconds=3600)
def prepare_data(ctx: StageContext, data: DataConfig) -> ArtifactRef:
    def build(folder: Path, run_id: str) -> dict:
        from rmens.data import prepare_pairs

        stats: Counter = Counter()
        train, val = prepare_pairs(data, stats)
        write_jsonl(folder / "train.jsonl", (p.to_dict() for p in train))
        write_jsonl(folder / "val.jsonl", (p.to_dict() for p in val))
        (folder / "stats.json").write_text(json.dumps(dict(stats), indent=2))
        _log_dataset(folder / "train.jsonl", train, f"{data.source}-train", "training")
        if val:
            _log_dataset(folder / "val.jsonl", val, f"{data.source}-val", "validation")
        return {"n_train": len(train), "n_val": len(val),
                "flipped": sum(bool(p.source.get("label_flipped")) for p in train)}

    return run_stage(ctx, "prepare_data", {"data": data}, build)
