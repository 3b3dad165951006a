"""Stage outputs as small JSON references: a folder, its content hash, and the MLflow run that made it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

REF_FILE = "ref.json"


class ArtifactRef(BaseModel):
    """What a task returns (and Prefect caches): never a model or tensor, only where it is."""

    stage: str
    key: str
    path: str
    sha256: str
    mlflow_run_id: str | None = None
    summary: dict[str, Any] = Field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return Path(self.path)

    def exists(self) -> bool:
        return (self.folder / REF_FILE).is_file()

    def require(self) -> ArtifactRef:
        if not self.exists():
            raise FileNotFoundError(f"the {self.stage} artifact {self.path} is gone; rerun with --refresh")
        return self


def content_hash(folder: str | Path) -> str:
    """sha256 over every file's relative path and bytes (ref.json excluded), in a stable order."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != REF_FILE):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def seal(ref: ArtifactRef) -> ArtifactRef:
    """Write ref.json last: a folder without it is incomplete and is rebuilt."""
    tmp = ref.folder / (REF_FILE + ".partial")
    tmp.write_text(json.dumps(ref.model_dump(mode="json"), indent=2))
    os.replace(tmp, ref.folder / REF_FILE)
    return ref


def read_ref(folder: str | Path) -> ArtifactRef:
    return ArtifactRef.model_validate_json((Path(folder) / REF_FILE).read_text())
