"""What a flow's config can be checked for before any work (no model built or converted, no server
started): its project folder can be one, its data sources exist and each trained max_length fits its
backbone's context. The CLI runs it before starting Prefect, and each flow runs it again at its start, for
runs a Prefect worker starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from rmens.config import EnsembleConfig
from rmens.data.loaders import check_sources
from rmens.models.context import check_max_lengths


class FlowSettings(Protocol):
    """What the pipeline's and the train, retrain and evaluate flows' configs have in common."""

    project_dir: str

    def data_sources(self) -> dict[str, BaseModel]: ...

    def trained_ensembles(self) -> dict[str, EnsembleConfig]: ...


def check_before_work(config: FlowSettings) -> None:
    check_project_dir(config.project_dir)
    check_sources(config.data_sources())
    check_max_lengths(config.trained_ensembles())


def check_project_dir(project_dir: str) -> None:
    """The project folder, or the nearest folder above it that exists, must be a folder rmens can write in."""
    path = Path(project_dir).expanduser()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                raise ValueError(f"project_dir {project_dir}: {place} is a file, not a folder")
            if not os.access(place, os.W_OK | os.X_OK):
                raise ValueError(f"project_dir {project_dir}: {place} is not writable")
            return
