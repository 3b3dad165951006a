"""Shared fixtures: a tiny random Llama, small pair sets, an offline environment, and one real Prefect server for
the tests that run rmens as a user would (its CLI, a deployment and a worker)."""

from __future__ import annotations

import os

from flows.cli import QUIET_ENV  # noqa: E402

for key, value in {**QUIET_ENV, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ.setdefault(key, value)

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
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
def standardised_ensemble(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved linear ensemble of 2 tiny members with standardisation statistics far from identity (so raw and
    standardised scores differ plainly): what a served or TRL reward loads."""
    from rmens.models.config import EnsembleConfig
    from rmens.models.ensemble import build_ensemble
    from rmens.models.standardise import MemberStandardisation

    ensemble = build_ensemble(EnsembleConfig(kind="linear", k=2, backbone="tiny-random-llama", max_length=64))
    ensemble.standardisation = MemberStandardisation(torch.tensor([3.0, -2.0], dtype=torch.float64),
                                                     torch.tensor([0.25, 4.0], dtype=torch.float64), 100)
    folder = tmp_path_factory.mktemp("standardised") / "ensemble"
    ensemble.save(folder, tiny_tokenizer)
    return folder


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One Prefect server for the session's real runs, started at its first request without waiting for it, so
    that it boots while tests that do not need it run (prefect_api waits). Started with the settings rmens
    starts its servers with."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(home)}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    yield f"http://127.0.0.1:{port}/api"
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.fixture()
def prefect_api(prefect_server):
    wait_for(lambda: answers(f"{prefect_server}/health"), 180, "the Prefect server to start")
    return prefect_server


def on_server(api: str, call):
    """`await call(client)` with a Prefect client of the server at `api`."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def run():
        async with get_client() as client:
            return await call(client)

    with temporary_settings({PREFECT_API_URL: api}):
        return asyncio.run(run())


def flow_run_logs(api: str, flow_run_id) -> list:
    """A flow run's logs as Prefect's UI shows them (its Logs tab), read back through the Prefect client."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return on_server(api, lambda client: client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))))
