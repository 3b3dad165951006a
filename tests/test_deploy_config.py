"""prefect.yaml and the docker stack, checked as far as possible without a Docker engine or a server."""

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_flow(entrypoint: str):
    path, name = entrypoint.split(":")
    spec = importlib.util.spec_from_file_location(f"deploy_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


@pytest.fixture(scope="module")
def prefect_yaml():
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def test_deployments_point_at_flows_with_valid_parameters(prefect_yaml):
    from prefect import Flow

    names = {d["name"] for d in prefect_yaml["deployments"]}
    assert {"pipeline-cpu", "pipeline-gpu", "evaluate", "retrain-nightly"} <= names
    for deployment in prefect_yaml["deployments"]:
        flow = load_flow(deployment["entrypoint"])
        assert isinstance(flow, Flow), deployment["name"]
        flow.validate_parameters(deployment.get("parameters", {}))  # pydantic validation, as a deployment does


def test_presets_named_by_deployments_load(prefect_yaml):
    from rmens.config import load_preset

    for deployment in prefect_yaml["deployments"]:
        preset = deployment.get("parameters", {}).get("preset")
        if preset:
            assert load_preset(preset).name == preset


def test_retrain_is_scheduled_and_pools_are_process_and_gpu_docker(prefect_yaml):
    from prefect.client.schemas.schedules import CronSchedule

    retrain = next(d for d in prefect_yaml["deployments"] if d["name"] == "retrain-nightly")
    CronSchedule(cron=retrain["schedules"][0]["cron"], timezone=retrain["schedules"][0]["timezone"])
    pools = prefect_yaml["definitions"]["work_pools"]
    assert pools["local"]["name"] == "rmens-local"
    gpu = pools["gpu"]["job_variables"]
    assert gpu["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    assert gpu["image"] == "{{ $RMENS_GPU_IMAGE }}"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def test_stack_services_bind_to_localhost_and_turn_auth_on(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "worker"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    assert "--app-name basic-auth" in services["mlflow"]["command"]
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == "${PREFECT_AUTH_STRING}"
    assert services["worker"]["environment"]["PREFECT_API_AUTH_STRING"] == "${PREFECT_AUTH_STRING}"


def test_secrets_come_only_from_the_env_file():
    text = (ROOT / "docker" / "compose.yaml").read_text() + (ROOT / "docker" / "basic_auth.ini").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)\}", text))
    example = {line.split("=")[0] for line in (ROOT / "docker" / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert used <= example, f"variables missing from .env.example: {used - example}"
    assert not re.search(r"(PASSWORD|SECRET)[A-Z_]*:\s*[^$\s{]", text), "a secret is written into the stack files"
    ignored = subprocess.run(["git", "check-ignore", "docker/.env"], cwd=ROOT, capture_output=True, text=True)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"


def test_gpu_image_installs_a_pinned_torch_and_the_project():
    text = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert re.search(r'ARG TORCH_VERSION=2\.\d+', text) and 'pip install "torch==${TORCH_VERSION}"' in text
    assert "import rmens, flows.pipeline, tasks.common" in text
