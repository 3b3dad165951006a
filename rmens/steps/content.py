"""The content of the files and folders a step reads from outside the store, for its key: a settings file
naming `data.jsonl` keys the step by what that file holds now, not by its name.

A file's sha256 is computed once per (path, size, mtime, inode) and remembered in
$RMENS_CACHE/content-hashes.json, so an unchanged 10 GB model folder costs a stat per file, not a read;
a file rewritten in place gets a new mtime and is hashed again. A folder's digest covers every file's
relative path and digest. A path that does not exist is keyed as missing (the checks before any work say so).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from pathlib import Path

from rmens.io import cache_root, file_sha256, write_json

_LOCK = threading.Lock()
_MEMO: dict[str, str] = {}
_LOADED: set[Path] = set()


def cache_file() -> Path:
    return cache_root() / "content-hashes.json"


def stamp(path: Path) -> str:
    """What a remembered hash is filed under: the file as a stat sees it."""
    stat = path.stat()
    return f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}"


def _file_digest(path: Path, fresh: dict[str, str]) -> str:
    seen = stamp(path)
    if seen not in _MEMO:
        _MEMO[seen] = fresh[seen] = file_sha256(path)
    return _MEMO[seen]


def _load(cache: Path) -> None:
    if cache in _LOADED:
        return
    _LOADED.add(cache)
    try:
        _MEMO.update(json.loads(cache.read_text()))
    except (OSError, ValueError):  # none yet, or unreadable: hashing again is only slower
        pass


def forget() -> None:
    """Drop what this process remembers, so that the cache file is read again (after `rmens verify --fix`)."""
    with _LOCK:
        _MEMO.clear()
        _LOADED.clear()


def content_digests(paths: Iterable[str | Path]) -> dict[str, str]:
    """{absolute path: sha256 of the file, or of a folder's files, or 'missing'} for each path."""
    cache = cache_file()
    out: dict[str, str] = {}
    fresh: dict[str, str] = {}
    with _LOCK:
        _load(cache)
        for raw in sorted({str(Path(p).expanduser().resolve()) for p in paths}):
            path = Path(raw)
            if path.is_file():
                out[raw] = _file_digest(path, fresh)
            elif path.is_dir():
                digest = hashlib.sha256()
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    digest.update(f"{file.relative_to(path).as_posix()}\0{_file_digest(file, fresh)}\0".encode())
                out[raw] = digest.hexdigest()
            else:
                out[raw] = "missing"
        if fresh:
            try:
                write_json(cache, _MEMO, indent=None)
            except OSError:  # a read-only cache folder costs only speed
                pass
    return out
