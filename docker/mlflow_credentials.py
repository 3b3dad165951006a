"""Give a flow run its MLflow account without putting the password into deployment job variables.

Run by the `pipeline-gpu` deployment's pull step (prefect-gpu.yaml) inside each flow-run container, before the
flow starts. It reads the Prefect Secret block named by RMENS_MLFLOW_SECRET_BLOCK (default
`rmens-mlflow-flows`, a JSON value `{"username": ..., "password": ...}`) through the Prefect API the run
already talks to, and writes MLflow's own credentials file, ~/.mlflow/credentials (mode 0600), which the
MLflow client reads when MLFLOW_TRACKING_USERNAME/PASSWORD are not set. The file lives in the run's
container only (a tmpfs there, see prefect-gpu.yaml); nothing is printed but the user name.

When both MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are already in the environment (a process
worker started from a shell that exports them), it leaves everything as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_BLOCK = "rmens-mlflow-flows"


def credentials_path() -> Path:
    """Where the MLflow client looks (mlflow.utils.credentials)."""
    return Path(os.path.expanduser("~/.mlflow/credentials"))


def _ini_value(value: str, what: str) -> str:
    if not value or "\n" in value or "\r" in value:
        raise ValueError(f"the MLflow {what} must be a non-empty single line")
    # MLflow reads the file with configparser's default interpolation, where a literal % is written %%.
    return value.replace("%", "%%")


def write_credentials(username: str, password: str, path: Path | None = None) -> Path:
    """Write an `[mlflow]` credentials file readable by its owner only, replacing any previous one."""
    path = path or credentials_path()
    text = (
        "[mlflow]\n"
        f"mlflow_tracking_username = {_ini_value(username, 'user name')}\n"
        f"mlflow_tracking_password = {_ini_value(password, 'password')}\n"
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when the file existed with wider permissions
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return path


def load_account(block_name: str) -> tuple[str, str]:
    """The flows' MLflow user name and password from a Prefect Secret block."""
    from prefect.blocks.system import Secret

    value = Secret.load(block_name).get()
    if not isinstance(value, dict) or not value.get("username") or not value.get("password"):
        raise ValueError(f'Secret block {block_name!r} must hold {{"username": ..., "password": ...}}')
    return str(value["username"]), str(value["password"])


def main() -> int:
    if os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        print("MLflow credentials come from this run's environment; nothing to write")
        return 0
    block_name = os.environ.get("RMENS_MLFLOW_SECRET_BLOCK", DEFAULT_BLOCK)
    try:
        username, password = load_account(block_name)
    except Exception as exc:  # noqa: BLE001 - report any failure as one line, without a traceback of values
        print(f"cannot read the MLflow account from Secret block {block_name!r}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    path = write_credentials(username, password)
    print(f"MLflow user {username!r} written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
