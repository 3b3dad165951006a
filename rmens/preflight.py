"""What a pipeline config can be checked for before any work (no model built or converted, no server
started): its project folder can be one, its data sources exist and each trained max_length fits its
backbone's context. The CLI runs
it before starting Prefect, and the flow runs it again at its start for deployments."""

from __future__ import annotations

from rmens.data.loaders import check_sources
from rmens.io import check_writable
from rmens.models.context import check_max_lengths
from rmens.pipeline.config import PipelineConfig


def check_before_work(config: PipelineConfig) -> None:
    check_writable(config.project_dir, "project_dir")
    check_sources(config.data_sources())
    check_max_lengths(config.trained_ensembles())
