"""What a flow's config can be checked for before any work (no model built or converted, no server
started): its project folder can be one, its data sources exist and each trained max_length fits its
backbone's context. The CLI runs it before starting Prefect, and each flow runs it again at its start, for
runs a Prefect worker starts."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel

from rmens.data.loaders import check_sources
from rmens.io import check_writable
from rmens.models.config import EnsembleConfig
from rmens.models.context import check_max_lengths


class FlowSettings(Protocol):
    """What the pipeline's and the train, retrain and evaluate flows' configs have in common."""

    project_dir: str

    def data_sources(self) -> dict[str, BaseModel]: ...

    def trained_ensembles(self) -> dict[str, EnsembleConfig]: ...


def check_before_work(config: FlowSettings) -> None:
    check_writable(config.project_dir, "project_dir")
    check_sources(config.data_sources())
    check_max_lengths(config.trained_ensembles())
