"""Where every benchmark leaves its figures: bench/out/<stem>.json (all numbers) and .txt (what it printed)."""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "out"


def write_json(stem: str, result: dict, folder: Path = OUT) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2))


def save_results(stem: str, result: dict, lines: list[str], folder: Path = OUT) -> None:
    """Print the summary lines and save them next to the full result."""
    text = "\n".join(lines)
    print(text)
    write_json(stem, result, folder)
    (folder / f"{stem}.txt").write_text(text + "\n")
