"""Small file helpers: every file rmens writes appears under its final name only when complete."""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rmens.data.schema import DataError


def cache_root() -> Path:
    """Where rmens keeps what it builds once per machine (converted models, content hashes): $RMENS_CACHE,
    else ~/.cache/rmens."""
    return Path(os.environ.get("RMENS_CACHE", Path.home() / ".cache" / "rmens")).expanduser().resolve()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write to a sibling temporary file and rename it into place (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj, *, indent: int | None = 2, ensure_ascii: bool = True) -> Path:
    """`obj` as JSON (indented for people to read unless indent=None), written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) from a JSONL file (optionally gzipped); bad JSON, a byte that is not
    UTF-8 or a damaged gzip stream is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    # Bytes, decoded line by line: a text stream decodes ahead in blocks, so its error could not name the line.
    lineno = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                    f"{err.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
                yield lineno, record
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}:{lineno + 1}: damaged gzip data ({err})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSONL file (optionally gzipped), with iter_jsonl's errors."""
    return [record for _, record in iter_jsonl(path)]


def check_writable(path: str | Path, setting: str, shown: str | Path | None = None) -> None:
    """`path`, or the nearest folder above it that exists, must be a folder this process can write in: said in
    one line naming the setting (and `shown`, default `path`) before any work, not as a traceback when the
    first result is saved."""
    path = Path(path).expanduser()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                raise ValueError(f"{setting} {shown or path}: {place} is a file, not a folder")
            if not os.access(place, os.W_OK | os.X_OK):
                raise ValueError(f"{setting} {shown or path}: {place} is not writable")
            return


def refuse_foreign_folder(path: str | Path, ours: bool, what: str, hint: str) -> None:
    """Refuse a folder that exists, holds something and is not `ours` (`what` it should be): whatever a user
    keeps there must never be overwritten or deleted."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.is_dir() and not ours and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not {what}; {hint}")


# A folder's files as {relative path: {size, mtime_ns, sha256}}, recorded when an artifact is finished so
# that reuse can check it cheaply: a file whose size and mtime are unchanged is trusted, any other file
# is re-hashed. (Content hashing alone would read every model weight on every cache hit.)
Manifest = dict[str, dict[str, int | str]]


def file_manifest(folder: str | Path, skip: Iterable[str] = ()) -> Manifest:
    folder, skip = Path(folder), set(skip)
    manifest: Manifest = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip):
        stat = path.stat()
        manifest[path.relative_to(folder).as_posix()] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                         "sha256": file_sha256(path)}
    return manifest


def manifest_changes(folder: str | Path, manifest: Manifest, rehash: bool = False) -> list[str]:
    """What differs from the recorded manifest ('missing: x', 'changed: y'); [] when intact. Files added
    since are ignored: only what the artifact was made of is checked. A file of the recorded size and mtime is
    trusted unless `rehash` (rmens verify)."""
    folder, changes = Path(folder), []
    for name, recorded in manifest.items():
        path = folder / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            changes.append(f"missing: {name}")
            continue
        if stat.st_size != recorded["size"]:
            changes.append(f"changed: {name} ({stat.st_size} bytes, recorded {recorded['size']})")
        elif (rehash or stat.st_mtime_ns != recorded["mtime_ns"]) and file_sha256(path) != recorded["sha256"]:
            changes.append(f"changed: {name} (content differs from its recorded sha256)")
    return changes


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
