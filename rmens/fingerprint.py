"""Cache-key material: a canonical form of settings, and a fingerprint of the source code that computes
something.

Hashing only a function's own text (as Prefect's TASK_SOURCE does) misses the helpers it calls, so the
fingerprint hashes every source file of the named modules and packages, found without importing them
(a run that only reuses cached results stays light).
"""

from __future__ import annotations

import ast
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


@functools.cache
def imported_closure(module: str, prefix: str = "rmens") -> tuple[str, ...]:
    """`module` and every `prefix` module it imports, directly or through others, read from their source
    without importing them: the code a step's output can depend on. Imports inside functions count;
    imports for type annotations only (under `if TYPE_CHECKING:`) do not. A package stands for its
    __init__.py here (a step that reads a whole package declares it)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_imports_of(name, prefix) - seen)
    return tuple(sorted(seen))


@functools.cache
def _source_of(module: str, prefix: str) -> Path | None:
    """The file of a module (a package's __init__.py); a `prefix` module is found by path, as find_spec would
    import its parents. A module outside `prefix` (a step declared in a test) is found by find_spec."""
    if module != prefix and not module.startswith(prefix + "."):
        spec = importlib.util.find_spec(module)
        return Path(spec.origin) if spec is not None and spec.origin else None
    root = Path(importlib.util.find_spec(prefix).origin).parent
    base = root.joinpath(*module.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.cache
def _imports_of(module: str, prefix: str) -> frozenset[str]:
    tree = ast.parse(_source_of(module, prefix).read_text(encoding="utf-8"))
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from package import module`
    ours = {name for name in found if name == prefix or name.startswith(prefix + ".")}
    return frozenset(name for name in ours if _source_of(name, prefix) is not None)


@functools.cache  # per process: a key is computed for every step call
def closure_fingerprint(module: str, prefix: str = "rmens") -> str:
    """The hash of the source of `module` and of every `prefix` module it imports (imported_closure)."""
    digest = hashlib.sha256()
    for name in imported_closure(module, prefix):
        digest.update(name.encode() + b"\0" + _source_of(name, prefix).read_bytes())
    return digest.hexdigest()


# A config field marked Field(json_schema_extra=NOT_IN_KEY) says where or how fast a result is computed, not
# what it is (an interpreter's path, a chunk size, a timeout, a placement): it stays out of cache keys, so that
# changing it reuses what was computed.
NOT_IN_KEY = {"rmens_key": False}


def placement_fields(model: BaseModel) -> dict[str, Any] | None:
    """pydantic's `exclude` for a model's NOT_IN_KEY fields, nested models included (None: none)."""
    excluded: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        if (field.json_schema_extra or {}) == NOT_IN_KEY:
            excluded[name] = True
        elif isinstance(getattr(model, name), BaseModel):
            inner = placement_fields(getattr(model, name))
            if inner:
                excluded[name] = inner
    return excluded or None


def canonical(value: Any, refer: Callable[[Any], Any] = lambda value: None) -> Any:
    """The JSON form of settings for a cache key: pydantic models by their fields, mappings with sorted keys,
    sequences as lists, paths as text. `refer` maps a reference to an earlier output (anything it does not
    return None for) to what identifies that output."""
    reference = refer(value)
    if reference is not None:
        return reference
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude=placement_fields(value))
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
