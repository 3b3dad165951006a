"""Where a project's artifacts, MLflow store and Prefect results live (one folder, absolute paths)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI; remember the values we set ourselves so that
# a later project in the same process is not sent to an earlier project's store.
_SET_HERE: set[str] = set()


def remember_tracking_uri(uri: str) -> None:
    _SET_HERE.add(uri)


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> ProjectPaths:
        return cls(Path(root).expanduser().resolve())

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def results(self) -> Path:
        return self.root / "prefect-results"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI when the user set it (a server), else the project's SQLite file by absolute path."""
        configured = os.environ.get("MLFLOW_TRACKING_URI")
        if configured and configured not in _SET_HERE:
            return configured
        return f"sqlite:///{self.mlflow_db}"

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.artifacts / stage / key[:16]

    def make(self) -> ProjectPaths:
        for path in (self.artifacts, self.results, self.locks, self.mlflow_artifacts):
            path.mkdir(parents=True, exist_ok=True)
        return self
