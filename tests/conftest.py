"""Shared fixtures: a tiny random Llama, small pair sets, and an offline environment."""

from __future__ import annotations

import os

from flows.cli import QUIET_ENV  # noqa: E402

for key, value in {**QUIET_ENV, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

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
