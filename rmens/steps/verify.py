"""`rmens verify`: every file re-hashed, whatever its size and mtime say.

Reuse trusts a file whose size and mtime match what was recorded (a stat, not a read, per file), and the
content of the files a step reads is remembered by path, size, mtime and inode (rmens.steps.content). A
byte changed without changing either goes unseen by both. This walk reads everything once: each finished
step folder against the sha256 in its done.json manifest, and each remembered content hash against its
file. With `fix`, a damaged step folder loses its done.json and started.json (the next run computes exactly
that step again, from scratch even where the step could resume: the folder is the store's own), and a
stale content hash is replaced (the steps that read that file get a new key and recompute). A run going on
meanwhile may write the stale hash back (each process keeps what it read): run it between runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rmens.io import file_sha256, manifest_changes, write_json
from rmens.steps import content
from rmens.steps.store import DONE, STARTED

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    """What one walk found: damaged step folders (folder -> problems), stale content hashes (file names),
    and how much was read."""

    damaged: dict[Path, list[str]] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0

    @property
    def intact(self) -> bool:
        return not self.damaged and not self.stale


def store_root(folder: str | Path) -> Path:
    """The store a project or experiment folder keeps (its `artifacts`), or `folder` when it is one."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}")
    root = folder / "artifacts" if (folder / "artifacts").is_dir() else folder
    if not any(root.glob(f"*/*/{DONE}")):
        raise ValueError(f"{folder} holds no finished step (no */*/{DONE} in {root}); give a project folder, "
                         "an experiment's --out folder, or their artifacts folder")
    return root


def verify(folder: str | Path, fix: bool = False, progress: Callable[[str], None] = log.info) -> Verdict:
    verdict = Verdict()
    steps = sorted(store_root(folder).glob(f"*/*/{DONE}"))
    for i, done in enumerate(steps, 1):
        progress(f"[{i}/{len(steps)}] {done.parent.parent.name}/{done.parent.name}")
        problems = _check_folder(done, verdict)
        if problems:
            verdict.damaged[done.parent] = problems
            if fix:  # unsealed and not resumable: the next run computes the step afresh, not from these files
                done.unlink()
                done.with_name(STARTED).unlink(missing_ok=True)
    verdict.stale = _check_content_hashes(fix, verdict)
    return verdict


def _check_folder(done: Path, verdict: Verdict) -> list[str]:
    try:
        manifest = json.loads(done.read_text()).get("files", {})
    except (OSError, ValueError) as err:
        return [f"unreadable {DONE} ({err})"]
    present = [done.parent / name for name in manifest if (done.parent / name).is_file()]
    verdict.files += len(present)
    verdict.bytes += sum(path.stat().st_size for path in present)
    return manifest_changes(done.parent, manifest, rehash=True)


def _check_content_hashes(fix: bool, verdict: Verdict) -> list[str]:
    """Remembered hashes of files that still look as they did when hashed (same path, size, mtime, inode)
    but whose bytes now hash differently."""
    cache = content.cache_file()
    try:
        remembered: dict[str, str] = json.loads(cache.read_text())
    except (OSError, ValueError):
        return []
    stale = []
    for stamp, digest in remembered.items():
        path = Path(stamp.split("\0", 1)[0])
        try:
            current = path.is_file() and content.stamp(path) == stamp
        except OSError:
            current = False
        if not current:
            continue  # a file changed since (it is hashed again when read) or gone: nothing to check
        verdict.files += 1
        verdict.bytes += path.stat().st_size
        actual = file_sha256(path)
        if actual != digest:
            stale.append(str(path))
            remembered[stamp] = actual
    if stale and fix:
        write_json(cache, remembered, indent=None)
        content.forget()
    return stale
