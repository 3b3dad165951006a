"""Shared fixtures: a tiny random Llama, small pair sets, and an offline environment."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rmens.data.loaders import synthetic_pairs  # noqa: E402
from rmens.models.backbone import TINY_ALIAS, load_tokenizer, resolve_model  # noqa: E402

TINY = TINY_ALIAS


@pytest.fixture(scope="session")
def tiny_path() -> str:
    return resolve_model(TINY)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    return load_tokenizer(tiny_path)


@pytest.fixture(scope="session")
def pairs():
    return synthetic_pairs(96, seed=1)


@pytest.fixture()
def no_grad():
    with torch.no_grad():
        yield


def real_data_dir() -> Path | None:
    value = os.environ.get("RMENS_DATA_DIR")
    return Path(value) if value and Path(value).is_dir() else None


requires_real_data = pytest.mark.skipif(real_data_dir() is None,
                                        reason="RMENS_DATA_DIR is not set to the offline data folder")
