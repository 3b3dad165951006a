"""A fingerprint of the source code that computes something, for cache keys.

Hashing only a function's own text (as Prefect's TASK_SOURCE does) misses the helpers it calls, so this
hashes every source file of the named modules and packages, found without importing them (a run that
only reuses cached results stays light).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path


def source_files(name: str) -> list[Path]:
    """Source files of a module, or of a package and its subpackages."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no module {name} to fingerprint")
    path = Path(spec.origin)
    return sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]


@functools.cache
def source_fingerprint(modules: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in modules:
        for path in source_files(name):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
