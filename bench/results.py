"""Where every benchmark leaves its figures: bench/out/<stem>.json (all numbers) and .txt (what it printed)."""

from __future__ import annotations

from pathlib import Path

from rmens import io as rmens_io

OUT = Path(__file__).parent / "out"


def write_json(stem: str, result: dict, folder: Path = OUT) -> None:
    rmens_io.write_json(folder / f"{stem}.json", result)


def save_results(stem: str, result: dict, lines: list[str], folder: Path = OUT) -> None:
    """Print the summary lines and save them next to the full result."""
    text = "\n".join(lines)
    print(text)
    write_json(stem, result, folder)
    (folder / f"{stem}.txt").write_text(text + "\n")
