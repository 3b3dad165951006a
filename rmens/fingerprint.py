"""Cache-key material: a canonical form of settings, and a fingerprint of the source code that computes
something.

Hashing only a function's own text (as Prefect's TASK_SOURCE does) misses the helpers it calls, so the
fingerprint hashes every source file of the named modules and packages, found without importing them
(a run that only reuses cached results stays light).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def source_files(name: str) -> dict[str, Path]:
    """Source files of a module, or of a package and its subpackages, by their path inside it (so that a
    moved or renamed file or folder changes the fingerprint, not only an edited one)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no module {name} to fingerprint")
    path = Path(spec.origin)
    if path.name != "__init__.py":
        return {name: path}
    return {f"{name}/{file.relative_to(path.parent).as_posix()}": file for file in sorted(path.parent.rglob("*.py"))}


@functools.cache
def source_fingerprint(modules: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in modules:
        for where, path in source_files(name).items():
            digest.update(where.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def canonical(value: Any, refer: Callable[[Any], Any] = lambda value: None) -> Any:
    """The JSON form of settings for a cache key: pydantic models by their fields, mappings with sorted keys,
    sequences as lists, paths as text. `refer` maps a reference to an earlier output (anything it does not
    return None for) to what identifies that output."""
    reference = refer(value)
    if reference is not None:
        return reference
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): canonical(v, refer) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canonical(v, refer) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def digest(obj: Any) -> str:
    """sha256 of an object's sorted JSON text."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
