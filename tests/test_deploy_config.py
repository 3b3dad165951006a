"""prefect.yaml, prefect-gpu.yaml and the docker stack, checked as far as possible without a Docker engine or a
server (tests/test_deployments.py deploys to a real one)."""

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


@pytest.fixture(scope="module")
def gpu_yaml():
    """The GPU deployments, in their own file so that `prefect deploy --all` needs only the process pool."""
    return yaml.safe_load((ROOT / "prefect-gpu.yaml").read_text())


@pytest.fixture(scope="module")
def deployments(prefect_yaml, gpu_yaml):
    return prefect_yaml["deployments"] + gpu_yaml["deployments"]


def test_deployments_point_at_flows_with_valid_parameters(prefect_yaml, gpu_yaml, deployments):
    from prefect import Flow

    assert {d["name"] for d in prefect_yaml["deployments"]} == {"pipeline-cpu", "evaluate", "retrain-nightly"}
    assert {d["name"] for d in gpu_yaml["deployments"]} == {"pipeline-gpu"}
    for deployment in deployments:
        flow = load_flow(deployment["entrypoint"])
        assert isinstance(flow, Flow), deployment["name"]
        flow.validate_parameters(deployment.get("parameters", {}))  # pydantic validation, as a deployment does


def test_presets_named_by_deployments_load(deployments):
    from rmens.pipeline.config import load_preset

    for deployment in deployments:
        preset = deployment.get("parameters", {}).get("preset")
        if preset:
            assert load_preset(preset).name == preset


def test_retrain_is_scheduled_one_at_a_time_and_pools_are_process_and_gpu_docker(prefect_yaml, gpu_yaml):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy
    from prefect.client.schemas.schedules import CronSchedule

    retrain = next(d for d in prefect_yaml["deployments"] if d["name"] == "retrain-nightly")
    CronSchedule(cron=retrain["schedules"][0]["cron"], timezone=retrain["schedules"][0]["timezone"])
    limit = retrain["concurrency_limit"]  # what happens to a run that would overlap the last one: said, not left
    assert limit["limit"] == 1 and ConcurrencyLimitStrategy(limit["collision_strategy"])
    assert {d["work_pool"]["name"] for d in prefect_yaml["deployments"]} == {"rmens-local"}
    gpu = gpu_yaml["definitions"]["work_pools"]["gpu"]
    assert gpu["name"] == "rmens-gpu"
    assert gpu["job_variables"]["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    assert gpu["job_variables"]["image"] == "{{ $RMENS_GPU_IMAGE }}"


def test_no_job_environment_comes_from_the_deployers_shell(prefect_yaml, gpu_yaml):
    """`prefect deploy` fills a `{{ $VAR }}` from the deployer's environment and stores '' when it is unset
    there; a worker then starts the flow run with {**its environment, **the job's env}, so the '' overrode
    the worker's RMENS_DATA_DIR or MLFLOW_TRACKING_URI. A process worker passes its own environment on:
    nothing in job env is needed for the local pool, and the GPU pool's values are fixed."""
    sections = [prefect_yaml.get("definitions", {}), *prefect_yaml["deployments"],
                gpu_yaml.get("definitions", {}), *gpu_yaml["deployments"]]
    for section in sections:
        for path, key, value in walk(section):
            if "env" in path and isinstance(value, str):
                assert "{{" not in value, f"{'.'.join(map(str, path))}.{key} = {value!r}"
    assert "job_variables" not in prefect_yaml["definitions"]["work_pools"]["local"]


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
    auth = "${PREFECT_AUTH_STRING:?set PREFECT_AUTH_STRING in docker/.env}"
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == auth
    assert services["worker"]["environment"]["PREFECT_API_AUTH_STRING"] == auth


def test_secrets_come_only_from_the_env_file():
    text = without_guards((ROOT / "docker" / "compose.yaml").read_text()
                          + (ROOT / "docker" / "basic_auth.ini").read_text())
    used = set(re.findall(r"\$\{([A-Z_]+)(?::\?[^}]*)?\}", text))
    example = {line.split("=")[0] for line in (ROOT / "docker" / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert used <= example, f"variables missing from .env.example: {used - example}"
    assert not re.search(r"(PASSWORD|SECRET)[A-Z_]*:\s*[^$\s{]", text), "a secret is written into the stack files"
    ignored = subprocess.run(["git", "check-ignore", "docker/.env"], cwd=ROOT, capture_output=True, text=True)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"


def test_the_stack_refuses_to_start_on_an_unset_variable_and_ships_no_default_secret():
    """Every ${VAR} of compose.yaml is ${VAR:?...} (compose stops, naming it, when it is unset or empty), and
    .env.example leaves every secret empty instead of offering a placeholder that would work."""
    text = (ROOT / "docker" / "compose.yaml").read_text()
    plain = [m.group(0) for m in re.finditer(r"(?<!\$)\$\{([^}]*)\}", text)
             if not re.fullmatch(r"[A-Z_]+:\?.+", m.group(1))]
    assert not plain, f"variables a blank .env would start the stack with: {plain}"
    example = dict(line.split("=", 1) for line in (ROOT / "docker" / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    secrets = {name: value for name, value in example.items() if SECRET_WORDS.search(name)}
    assert secrets and not any(secrets.values()), f"secrets with a value in .env.example: {secrets}"


def test_no_service_runs_as_root_but_the_socket_proxy_and_postgres_entrypoint(compose):
    """A service is unprivileged by its compose `user:` or by a USER line in the Dockerfile it is built from;
    the Docker proxy must read the socket, and PostgreSQL's image drops to its own user by itself."""
    for name, service in compose["services"].items():
        if name in ("docker-proxy", "postgres"):
            continue
        build = service.get("build")
        dockerfile = (ROOT / "docker" / build["context"] / build["dockerfile"]) if build else None
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE) if dockerfile else []
        user = str(service.get("user") or (users[-1] if users else "root"))
        assert user.split(":")[0] not in ("root", "0"), f"{name} runs as root"


def test_gpu_image_installs_a_pinned_torch_and_the_project():
    text = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert re.search(r'ARG TORCH_VERSION=2\.\d+', text) and 'pip install "torch==${TORCH_VERSION}"' in text
    assert "import rmens, flows.pipeline, tasks.steps" in text


# --- security of the stack -------------------------------------------------------------------------------

SOCKET = "/var/run/docker.sock"
# What a Prefect docker worker calls: create/inspect/start/stop/log/wait containers, look up and pull images.
PROXY_GRANTED = {"CONTAINERS", "IMAGES", "POST", "VERSION", "PING", "ALLOW_START", "ALLOW_STOP", "ALLOW_LOGS"}
PROXY_MUST_DENY = {
    "AUTH", "BUILD", "COMMIT", "CONFIGS", "DISTRIBUTION", "EVENTS", "EXEC", "GRPC", "INFO", "NETWORKS", "NODES",
    "PLUGINS", "SECRETS", "SERVICES", "SESSION", "SWARM", "SYSTEM", "TASKS", "VOLUMES", "DELETE", "PUT", "PATCH",
    "ALLOW_EXEC", "ALLOW_ARCHIVE", "ALLOW_ATTACH", "ALLOW_EXPORT", "ALLOW_KILL", "ALLOW_RESTARTS",
    "ALLOW_PAUSE", "ALLOW_UNPAUSE",
}
SECRET_WORDS = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|AUTH|API_KEY|CREDENTIAL", re.IGNORECASE)


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a compose service's volumes, short or long syntax."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            found.append((source, target, len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            found.append((volume.get("source", ""), volume["target"], bool(volume.get("read_only"))))
    return found


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: str(value) for key, value in env.items()}


def env_example() -> dict[str, str]:
    lines = (ROOT / "docker" / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_only_the_read_only_proxy_holds_the_docker_socket(compose):
    holders = {}
    for name, service in compose["services"].items():
        for source, target, read_only in mounts(service):
            if "docker.sock" in source or "docker.sock" in target:
                holders[name] = (source, read_only)
        assert not service.get("privileged"), f"{name} runs privileged"
    assert holders == {"docker-proxy": (SOCKET, True)}, f"services mounting the Docker socket: {holders}"
    worker = environment(compose["services"]["worker"])
    assert worker["DOCKER_HOST"] == "tcp://docker-proxy:2375"


def test_docker_proxy_is_unpublished_internal_and_denies_what_the_worker_does_not_need(compose):
    services = compose["services"]
    proxy = services["docker-proxy"]
    assert not proxy.get("ports") and not proxy.get("expose"), "the Docker API proxy must not be published"
    assert proxy.get("network_mode") is None
    assert proxy["networks"] == ["docker-api"]
    assert compose["networks"]["docker-api"].get("internal") is True
    on_api_network = {name for name, service in services.items() if "docker-api" in service.get("networks", [])}
    assert on_api_network == {"docker-proxy", "worker"}
    assert ":" in proxy["image"] and not proxy["image"].endswith(":latest"), "pin the proxy image"

    env = environment(proxy)
    granted = {key for key, value in env.items() if value.strip().lower() in {"1", "true", "yes"}}
    assert granted <= PROXY_GRANTED, f"proxy grants more than the worker needs: {granted - PROXY_GRANTED}"
    assert {"CONTAINERS", "IMAGES", "POST"} <= granted
    not_denied = {key for key in PROXY_MUST_DENY if env.get(key) != "0"}
    assert not not_denied, f"set these to \"0\" explicitly: {sorted(not_denied)}"


def test_mlflow_grants_nothing_by_default():
    import configparser

    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "docker" / "basic_auth.ini")
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"


def without_guards(text: str) -> str:
    """${VAR:?message} as ${VAR}: the variable a value names, without compose's refusal to start unset."""
    return re.sub(r"\$\{([A-Z_]+):\?[^}]*\}", r"${\1}", text)


def url_user(url: str) -> str:
    match = re.match(r"^[a-z0-9+]+://([^:@/]+)(?::[^@]*)?@", without_guards(url))
    assert match, f"no user in {url!r}"
    return match.group(1)


def test_prefect_and_mlflow_use_their_own_database_roles(compose):
    import configparser

    services = compose["services"]
    prefect_url = environment(services["prefect-server"])["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    mlflow_env = environment(services["mlflow"])
    mlflow_url = mlflow_env["MLFLOW_BACKEND_STORE_URI"]
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "docker" / "basic_auth.ini")
    auth_url = ini["mlflow"]["database_uri"]
    assert "--backend-store-uri" not in services["mlflow"]["command"], "keep the DB password off the command line"

    superuser = without_guards(environment(services["postgres"])["POSTGRES_USER"])
    users = {"prefect": url_user(prefect_url), "mlflow": url_user(mlflow_url), "mlflow_auth": url_user(auth_url)}
    assert users["prefect"] != users["mlflow"], "Prefect and MLflow share a database user"
    assert superuser not in users.values(), f"a service logs in as the superuser {superuser}"
    assert users["mlflow_auth"] == users["mlflow"]
    # each URL names its own password variable, and the example env file gives three different roles
    assert re.search(r":\$\{PREFECT_DB_PASSWORD\}@", without_guards(prefect_url))
    assert re.search(r":\$\{MLFLOW_DB_PASSWORD\}@", without_guards(mlflow_url))
    example = env_example()
    roles = [example[name.strip("${}")] for name in (superuser, users["prefect"], users["mlflow"])]
    assert len(set(roles)) == 3 and "postgres" not in roles[1:], roles

    # the init script that creates those roles is mounted and gets every variable it reads
    postgres = services["postgres"]
    assert any(source == "./postgres-init.sh" and target.startswith("/docker-entrypoint-initdb.d/") and read_only
               for source, target, read_only in mounts(postgres))
    script = (ROOT / "docker" / "postgres-init.sh").read_text()
    assert set(re.findall(r"\$\{([A-Z_]+)", script)) <= set(environment(postgres))
    for role in ("prefect_user", "mlflow_user"):
        assert re.search(rf'CREATE ROLE :"{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD', script)
    for database, owner in (("prefect", "prefect_user"), ("mlflow", "mlflow_user"), ("mlflow_auth", "mlflow_user")):
        assert f'CREATE DATABASE {database} OWNER :"{owner}";' in script
        assert f"REVOKE ALL ON DATABASE {database} FROM PUBLIC;" in script


def test_mlflow_container_gets_every_variable_its_auth_config_needs(compose):
    used = set(re.findall(r"\$\{([A-Z_]+)\}", (ROOT / "docker" / "basic_auth.ini").read_text()))
    assert used <= set(environment(compose["services"]["mlflow"])), "envsubst would leave these empty"
    worker = environment(compose["services"]["worker"])
    assert not {key for key in worker if key.startswith("MLFLOW_TRACKING_")}, "the docker worker needs no MLflow login"


def walk(node, path=()):
    """Yield (path, key, value) for every mapping entry and list item below node."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield path, index, value
            yield from walk(value, (*path, index))


def test_job_variables_and_env_carry_no_secrets(prefect_yaml, gpu_yaml):
    sections = []
    for document in (prefect_yaml, gpu_yaml):
        sections.append(("definitions", document.get("definitions", {})))
        sections += [(d["name"], d) for d in document["deployments"]]
        sections.append(("pull", document.get("pull") or []))
    checked = 0
    for name, section in sections:
        for path, key, value in walk(section):
            inside = "job_variables" in path or "env" in path
            if not inside:
                continue
            checked += 1
            if isinstance(key, str):
                assert not SECRET_WORDS.search(key), f"{name}: {'.'.join(map(str, path))}.{key} names a secret"
            if isinstance(value, str):
                for placeholder in re.findall(r"\{\{(.*?)\}\}", value):
                    assert not SECRET_WORDS.search(placeholder), f"{name}: {key} = {value!r} fills in a secret"
    assert checked > 10


def test_gpu_runs_read_their_mlflow_account_at_run_time(gpu_yaml):
    gpu = next(d for d in gpu_yaml["deployments"] if d["name"] == "pipeline-gpu")
    steps = [next(iter(step.items())) for step in gpu["pull"]]
    assert steps[0] == ("prefect.deployments.steps.set_working_directory", {"directory": "/opt/rmens"})
    script = next(inputs["script"] for fqn, inputs in steps if fqn.endswith("run_shell_script"))
    helper = script.split()[-1]
    assert helper == "/opt/rmens/docker/mlflow_credentials.py" and (ROOT / "docker" / "mlflow_credentials.py").is_file()
    for _, inputs in steps:
        assert "env" not in inputs and "{{" not in str(inputs), "pull steps are stored too: no templated values"
    tmpfs = gpu["work_pool"]["job_variables"]["container_create_kwargs"]["tmpfs"]
    assert "/root/.mlflow" in tmpfs


@pytest.fixture()
def credentials_helper(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    spec = importlib.util.spec_from_file_location("mlflow_credentials", ROOT / "docker" / "mlflow_credentials.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_credentials_file_is_what_mlflow_reads_back(credentials_helper, tmp_path, capsys):
    from mlflow.utils.credentials import read_mlflow_creds

    credentials_helper.load_account = lambda block: ("rmens-flows", "p%ss:w0rd=#;x")
    assert credentials_helper.main() == 0
    path = tmp_path / ".mlflow" / "credentials"
    assert path.stat().st_mode & 0o777 == 0o600
    creds = read_mlflow_creds()
    assert (creds.username, creds.password) == ("rmens-flows", "p%ss:w0rd=#;x")
    assert "w0rd" not in capsys.readouterr().out
    with pytest.raises(ValueError):
        credentials_helper.write_credentials("rmens-flows", "two\nlines")


def test_credentials_helper_fails_the_run_without_an_account(credentials_helper, tmp_path, monkeypatch):
    def missing(block):
        raise ValueError(f"no block {block}")

    credentials_helper.load_account = missing
    assert credentials_helper.main() == 1
    assert not (tmp_path / ".mlflow").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "rmens-flows")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-the-worker")
    assert credentials_helper.main() == 0 and not (tmp_path / ".mlflow").exists()


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes; `**/` matches zero or more folders."""
    from fnmatch import fnmatchcase

    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = {pattern, pattern[3:]} if pattern.startswith("**/") else {pattern}
        parents = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
        if any(fnmatchcase(p, c) for p in parents for c in candidates):
            excluded = not negated
    return excluded


def test_gpu_image_build_context_leaves_out_the_env_file():
    lines = (ROOT / "docker" / "Dockerfile.gpu.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for secret in ("docker/.env", ".env", ".venv/bin/python", "runs/cpu/mlflow.db"):
        assert dockerignored(secret, patterns), secret
    for needed in ("docker/mlflow_credentials.py", "rmens/__init__.py", "flows/pipeline.py", "tasks/steps.py",
                   "pyproject.toml", "README.md", "docker/.env.example"):
        assert not dockerignored(needed, patterns), needed


def test_compose_config_renders():
    """`docker compose config` with the example env file, where a compose CLI exists (not on the dev machines)."""
    try:
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("docker compose is not available here: `docker compose config` could not be run")
    result = subprocess.run(
        ["docker", "compose", "-f", "docker/compose.yaml", "--env-file", "docker/.env.example", "config", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
