"""The reward ensemble as an MLflow model: logged from code (tasks/registry/reward_model_code.py) with its weights as
artifacts, registered, and read back as weights only (scoring a registered model runs no stored code)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd

MODEL_CODE = Path(__file__).with_name("reward_model_code.py")
ENSEMBLE_ARTIFACT = "ensemble"


def rmens_requirement() -> str:
    """The exact rmens the model was logged with: `mlflow models serve` installs its requirements, and an
    unpinned name would install whatever a package index serves under it."""
    from importlib.metadata import version

    return f"rmens=={version('rmens')}"


def log_and_register(ensemble_dir: str, registered_name: str | None, aliases: list[str], aggregation: dict,
                     name: str = "reward_ensemble"):
    """Log the ensemble folder as a pyfunc model named `name` (the arm's run: MLflow's Models tab lists them
    by it) in the active run; register it and set aliases."""
    example = pd.DataFrame({"prompt": ["What is 2 + 2?"], "response": ["4"]})
    info = mlflow.pyfunc.log_model(
        name=re.sub(r"[/:.%\"']", "-", name), python_model=str(MODEL_CODE), artifacts={ENSEMBLE_ARTIFACT: ensemble_dir},
        model_config={"aggregation": aggregation}, pip_requirements=[rmens_requirement()], input_example=example,
        signature=mlflow.models.infer_signature(example, pd.DataFrame({"reward": [0.0], "std": [0.0]})),
    )
    version = None
    if registered_name:
        with _quiet_registry_prints():
            version = mlflow.register_model(info.model_uri, registered_name).version
        client = mlflow.MlflowClient()
        for alias in aliases:
            client.set_registered_model_alias(registered_name, alias, version)
    return info.model_uri, version


@contextlib.contextmanager
def _quiet_registry_prints() -> Iterator[None]:
    """MLflow prints "Successfully registered model ..." and "Created version ..." to the console whatever its
    log level (its event stream); the run records the version as a tag and in the step's summary instead."""
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    enabled, MLFLOW_LOGGING_STREAM.enabled = MLFLOW_LOGGING_STREAM.enabled, False
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = enabled


def download_ensemble(model_uri: str, dst: str | Path) -> Path:
    """The registered model's ensemble folder (safetensors weights and JSON configs), without loading the
    pyfunc: whoever can write to the artifact store cannot make this process run code."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    folder = local / "artifacts" / ENSEMBLE_ARTIFACT
    if not folder.is_dir():
        raise FileNotFoundError(f"{model_uri} holds no {ENSEMBLE_ARTIFACT}/ folder; is it an rmens reward ensemble?")
    return folder
