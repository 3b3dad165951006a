"""Small file helpers: every file rmens writes appears under its final name only when complete."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write to a sibling temporary file and rename it into place (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def refuse_foreign_folder(path: str | Path, ours: bool, what: str, hint: str) -> None:
    """Refuse a folder that exists, holds something and is not `ours` (`what` it should be): whatever a user
    keeps there must never be overwritten or deleted."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.is_dir() and not ours and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not {what}; {hint}")
