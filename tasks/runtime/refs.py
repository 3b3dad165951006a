"""Stage outputs as small JSON references: a folder, its content hash, and the MLflow run that made it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from rmens.io import Manifest, file_manifest, manifest_changes

REF_FILE = "ref.json"


class ArtifactRef(BaseModel):
    """What a task returns (and Prefect caches): never a model or tensor, only where it is."""

    stage: str
    key: str
    path: str
    sha256: str
    mlflow_run_id: str | None = None
    summary: dict[str, Any] = Field(default_factory=dict)
    # Sizes, mtimes and hashes of the files, recorded when the folder was finished (rmens.io.file_manifest).
    files: Manifest = Field(default_factory=dict, repr=False)

    @property
    def folder(self) -> Path:
        return Path(self.path)

    def exists(self) -> bool:
        return (self.folder / REF_FILE).is_file()

    def require(self) -> ArtifactRef:
        if not self.exists():
            raise FileNotFoundError(f"the {self.stage} artifact {self.path} is gone; rerun with --refresh")
        return self


def fingerprint_folder(folder: str | Path) -> tuple[str, Manifest]:
    """(content hash, manifest): the hash covers every file's relative path and bytes, ref.json excluded."""
    manifest = file_manifest(folder, skip=(REF_FILE, REF_FILE + ".partial"))
    digest = hashlib.sha256()
    for name, entry in manifest.items():
        digest.update(f"{name}\0{entry['sha256']}\0".encode())
    return digest.hexdigest(), manifest


def changes_since_sealed(folder: str | Path) -> list[str]:
    """How a finished folder differs from what its ref.json recorded ([] when intact). An unreadable
    ref.json is a change too: the folder is rebuilt rather than the run stopped."""
    try:
        ref = read_ref(folder)
    except ValueError as err:  # bad bytes, bad JSON, fields missing (pydantic's ValidationError included)
        return [f"{REF_FILE} unreadable ({type(err).__name__})"]
    return manifest_changes(folder, ref.files)


def seal(ref: ArtifactRef) -> ArtifactRef:
    """Write ref.json last: a folder without it is incomplete and is rebuilt."""
    tmp = ref.folder / (REF_FILE + ".partial")
    tmp.write_text(json.dumps(ref.model_dump(mode="json"), indent=2))
    os.replace(tmp, ref.folder / REF_FILE)
    return ref


def read_ref(folder: str | Path) -> ArtifactRef:
    return ArtifactRef.model_validate_json((Path(folder) / REF_FILE).read_text())
