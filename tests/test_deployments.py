"""prefect.yaml deployed as the README says (`prefect --no-prompt deploy --all` in the checkout) to a real local
Prefect server, and the nightly retrain run through a process worker whose environment names the data folder
and the MLflow store, as a scheduled run would be."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ae_data import instructions, synthetic_annotations
from conftest import answers, flow_run_logs, on_server, wait_for
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"pipeline-cpu", "evaluate", "retrain-nightly"}


def _prefect(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _checkout_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def api(prefect_server):
    wait_for(lambda: answers(f"{prefect_server}/health"), 180, "the Prefect server to start")
    return prefect_server


@pytest.fixture(scope="module")
def deployed(api, tmp_path_factory):
    """The process pool and `prefect deploy --all`, by someone whose shell sets neither RMENS_DATA_DIR nor
    MLFLOW_TRACKING_URI (before, both were stored as '' and then overrode the worker's values)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RMENS_DATA_DIR", "MLFLOW_TRACKING_URI", "RMENS_WORKDIR")}
    env.update({"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path_factory.mktemp("deployer-home"))})
    pool = _prefect("work-pool", "create", "--type", "process", "rmens-local", "--overwrite", env=env)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    before = _checkout_state()
    deploy = _prefect("deploy", "--all", env=env)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    after = _checkout_state()

    async def read(client):
        return {d.name: d for d in await client.read_deployments()}

    return on_server(api, read), before, after


def test_deploy_all_needs_only_the_process_pool_and_leaves_the_workers_environment_alone(deployed):
    deployments, before, after = deployed
    assert LOCAL <= set(deployments) and "pipeline-gpu" not in deployments  # prefect-gpu.yaml, on purpose
    for name in LOCAL:
        assert deployments[name].work_pool_name == "rmens-local"
        assert "env" not in deployments[name].job_variables, (name, deployments[name].job_variables)
        # resolved when a run starts, in the worker's environment
        assert deployments[name].pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $RMENS_WORKDIR }}"}}]
    retrain = deployments["retrain-nightly"]
    assert [s.schedule.cron for s in retrain.schedules] == ["0 3 * * *"]
    limit = retrain.global_concurrency_limit
    assert limit.limit == 1 and retrain.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert before == after, "deploying wrote into the checkout"


RETRAIN = {"label": "nightly", "registered_model": "rmens-deployed",
           "data": {"source": "alpaca_eval", "max_pairs": 64, "val_fraction": 0.3},  # from RMENS_DATA_DIR
           "ensemble": {"backbone": "tiny-random-llama", "kind": "linear", "k": 1, "max_length": 64},
           "train": {"epochs": 1, "batch_size": 8, "progress": False, "warmup_ratio": 0.0}}


@pytest.fixture(scope="module")
def worker(deployed, api, tmp_path_factory):
    """`prefect worker start --pool rmens-local`, started elsewhere than the checkout, from a shell that names the
    checkout, the data folder and the MLflow store."""
    home = tmp_path_factory.mktemp("worker")
    synthetic_annotations(home / "data" / "alpaca_eval", instructions(12))
    store = home / "tracking" / "mlflow.db"
    store.parent.mkdir()
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(home / ".prefect"), "RMENS_WORKDIR": str(ROOT),
           "RMENS_DATA_DIR": str(home / "data"), "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
           "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = home / "worker.log"
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "rmens-local",
                                 "--name", "rmens-test"], cwd=home, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
    yield {"home": home, "store": store, "log": log}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def _run(api: str, config: dict, timeout: float = 300):
    """A run of the nightly deployment with `config`, as the schedule starts one, waited for."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        return run_deployment("rmens-retrain/retrain-nightly", parameters={"config": config}, timeout=timeout)


def test_a_deployed_retrain_runs_in_the_workers_environment_quietly_and_logs_to_the_ui(worker, api):
    project = worker["home"] / "retrain"
    start = time.monotonic()
    run = _run(api, {**RETRAIN, "project_dir": str(project)})
    took = time.monotonic() - start
    console = worker["log"].read_text()
    assert run.state_name == "Completed", f"{run.state}\n{console[-5000:]}"

    # The worker's MLflow store got the run and the registered model, and the project made no store of its own.
    client = MlflowClient(f"sqlite:///{worker['store']}")
    assert client.get_registered_model("rmens-deployed").aliases == {"candidate": 1, "champion": 1, "nightly": 1}
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.`rmens.flow` = 'retrain:nightly'")[0]
    assert parent.data.tags["rmens.decision"] == "promoted"
    assert parent.data.tags["prefect.flow_run_id"] == str(run.id)
    assert not (project / "mlflow.db").exists()
    # The pairs came from the worker's RMENS_DATA_DIR (the folder made above).
    train_pairs = next(project.glob("artifacts/prepare_data/*/train.jsonl")).read_text()
    assert "say something about fruit" in train_pairs

    # The console as the CLI keeps it: stage lines, none of Prefect's INFO lines, no bars, no MLflow INFO.
    assert "train_ensemble:nightly" in console and "computed in" in console
    for noise in ("Beginning flow run", "Finished in state", "it/s]", "INFO mlflow"):
        assert noise not in console, (noise, console[-5000:])
    # Prefect's UI has the run's logs (its Logs tab), the stage lines among them.
    messages = [log.message for log in flow_run_logs(api, run.id)]
    assert any(m.startswith("Beginning flow run") for m in messages), messages
    assert any("train_ensemble:nightly" in m for m in messages) and "Finished in state Completed()" in messages
    print(f"deployed retrain: {took:.1f} s from run_deployment to Completed")


def test_a_bad_setting_in_a_deployed_run_is_one_error_line(worker, api):
    before = worker["log"].read_text()
    run = _run(api, {**RETRAIN, "project_dir": str(worker["home"] / "bad"),
                     "data": {**RETRAIN["data"], "path": "/nonexistent/alpaca_eval"}})
    assert run.state_name == "Failed"
    expected = "rmens: error: data.source=alpaca_eval: no data folder at /nonexistent/alpaca_eval"
    assert run.state.message.startswith(expected)
    wait_for(lambda: expected in worker["log"].read_text(), 30, "the worker's console line")
    time.sleep(2)  # what the flow-run process prints as it exits
    console = worker["log"].read_text()[len(before):]
    assert console.count("rmens: error:") == 1 and "Traceback" not in console, console
