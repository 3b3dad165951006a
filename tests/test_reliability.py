"""Kill it, run it twice, run two at once: real `rmens` processes on the smoke preset and the train flow.

Each test starts the command as a user would (python -m flows.cli) in a fresh project folder, so what is
checked is what a user gets: exit codes, what is left on disk, and the MLflow store's run statuses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import answers, flow_run_logs, free_port, wait_for
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _start_the_server_early(prefect_server):
    """The session's Prefect server (conftest) boots while the first tests, which do not need it, run. A run
    without PREFECT_API_URL starts its own, as the SIGTERM test checks."""


# The smoke preset cut to one ensemble arm, one rule, one PPO arm and one MT-Bench question: every kind of
# stage still runs, in less time.
SMALL = ["--set", "arms=[{kind: single}, {kind: linear, k: 3}]", "--set", "rules=[{rule: mean}]",
         "--set", "ppo_arms=[single]",
         "--set", "evaluate.mt_bench_questions=1"]


def _env(tmp_path: Path, api: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update({"RMENS_HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / ".prefect"), "PYTHONPATH": str(ROOT)})
    if api:
        env["PREFECT_API_URL"] = api
    return env


def _rmens(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """The command with its output in a file (as a terminal would, it never blocks the writer)."""
    log = Path(env["RMENS_HOME"]) / f"output-{time.monotonic_ns()}.txt"
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"the run did not finish within {timeout} s (a hang?); its output: {proc.log}") \
            from None
    return proc.log.read_text()


def _lock(project: Path, stage: str) -> Path | None:
    return next(iter(sorted((project / "locks").glob(f"{stage}-*.lock"))), None)


def _runs(project: Path):
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=5000)


def _sealed(project: Path) -> dict[str, int]:
    return {str(p.parent): p.stat().st_mtime_ns for p in (project / "artifacts").glob("*/*/done.json")}


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["sigterm", "ctrl-c"])
def test_a_signal_to_the_process_group_stops_the_run_and_its_server_at_once(tmp_path, signum, code):
    """Without a Prefect API the run starts a temporary server; SIGTERM or Ctrl-C to the whole process group
    (what a supervisor or a terminal sends) stops the run within seconds with 143/130 and one line, its MLflow
    runs marked KILLED, its locks released and its server stopped."""
    project = tmp_path / "smoke"
    run = _rmens("run", "--set", f"project_dir={project}", *SMALL, env=_env(tmp_path, None))
    wait_for(lambda: _lock(project, "train_ensemble") or run.poll() is not None, 240, "training to start")
    children = psutil.Process(run.pid).children(recursive=True)
    assert children, "the run should have started a temporary Prefect server"
    os.killpg(run.pid, signum)
    start = time.monotonic()
    out = _finish(run, 60)
    # A shell reports a process that ends by SIGINT as 130, exactly as one that exits 130: Python ends that
    # way when a KeyboardInterrupt is flagged unhandled, which happened here in 2 of about 12 runs after the
    # interrupt had been handled (cause not found), so -2 is the same outcome for a user.
    assert run.returncode == code or (signum == signal.SIGINT and run.returncode == -signal.SIGINT), \
        f"not stopped by {signum!r} (exit {run.returncode}); output in {run.log}"
    assert time.monotonic() - start < 30, "stopping took more than seconds"
    assert out.rstrip().endswith("the next run continues from them"), out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    statuses = {r.info.status for r in _runs(project)}
    assert "RUNNING" not in statuses and "KILLED" in statuses
    assert not list((project / "locks").glob("*.lock"))


# Where the sweep kills `rmens run`: seconds after launch (imports, the plan check, MLflow's store, the flow's
# start), then as soon as a stage of each kind holds its lock (in plan order, each run getting one further).
STARTUP_KILLS = (0.5, 2.0, 4.0)
STAGE_KILLS = ("train_ensemble", "sample", "score", "ppo", "evaluate", "report")


def _new_lock(project: Path, stages: tuple[str, ...], stale: set[Path]) -> bool:
    return any(path not in stale for stage in stages for path in (project / "locks").glob(f"{stage}-*.lock"))


def test_a_run_killed_at_any_instant_leaves_a_project_the_next_run_finishes(tmp_path, prefect_api):
    """SIGKILL to the whole process group at a spread of instants in the first seconds and during each kind of
    stage, one after another on the same project. The next run then takes over the dead runs' locks, closes
    their MLflow runs as KILLED, reuses every finished stage, recomputes a cached artifact corrupted meanwhile,
    and finishes."""
    project = tmp_path / "smoke"
    env = _env(tmp_path, prefect_api)
    for point in (*STARTUP_KILLS, *STAGE_KILLS):
        stale = set((project / "locks").glob("*.lock"))  # what the runs killed before left
        run = _rmens("run", "--set", f"project_dir={project}", *SMALL, env=env)
        if isinstance(point, float):
            time.sleep(point)
        else:
            # a new lock of that stage, or of a later one when that stage was too quick to be seen
            later = STAGE_KILLS[STAGE_KILLS.index(point):]
            wait_for(lambda proc=run, stages=later, old=stale: _new_lock(project, stages, old)
                     or proc.poll() is not None, 240, f"a run to reach {point}")
        assert run.poll() is None, f"the run ended before the kill at {point}; output in {run.log}"
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert _lock(project, "report") is not None, "the scenario needs the last dead run's lock left behind"
    assert any(r.info.status == "RUNNING" for r in _runs(project))

    finished = _sealed(project)
    # A cached artifact damaged after it was made: the Best-of-n samples, which the report does not read, so
    # that the report keeps its key and meets the dead run's lock.
    damaged = max((p for p in project.glob("artifacts/sample/*/*")
                   if p.is_file() and p.name not in ("done.json", "started.json")), key=lambda p: p.stat().st_size)
    damaged.write_bytes(b"")
    out = _finish(_rmens("run", "--set", f"project_dir={project}", *SMALL, env=env), 300)

    assert "finished in" in out, out[-3000:]
    assert "taking it over" in out
    # The console: a line per stage as it ends, cached or computed; no third-party warning.
    assert "report:report" in out and " cached in " in out and " computed in " in out
    assert "Warning" not in out, [line for line in out.splitlines() if "Warning" in line]
    assert "changed since it was made" in out and damaged.stat().st_size > 0
    assert not any(r.info.status == "RUNNING" for r in _runs(project))
    assert any(r.info.status == "KILLED" for r in _runs(project))
    still = _sealed(project)
    reused = [folder for folder, mtime in finished.items() if still.get(folder) == mtime]
    assert len(reused) == len(finished) - 1, "every finished stage but the damaged one is reused as it was"
    assert not list((project / "locks").glob("*.lock")), "every lock is released"


TRAIN_CONFIG = {
    "label": "tiny",
    "data": {"source": "synthetic", "max_pairs": 32, "val_fraction": 0.25},
    "ensemble": {"backbone": "tiny-random-llama", "kind": "linear", "k": 1, "max_length": 64},
    "train": {"epochs": 1, "batch_size": 8, "progress": False, "warmup_ratio": 0.0},
    "registered_model": "rmens-race",
    "log_model": False,
}


def _two_together(flow: str, settings: dict, tmp_path: Path, api: str | None) -> list[str]:
    """`rmens flow <flow>` twice at once on one config; both must succeed, without a traceback: their outputs."""
    config = tmp_path / f"{flow}.yaml"
    config.write_text(yaml.safe_dump(settings))
    runs = [_rmens("flow", flow, "--config", str(config), env=_env(tmp_path, api)) for _ in range(2)]
    outputs = [_finish(run, 300) for run in runs]
    for run, out in zip(runs, outputs):
        assert run.returncode == 0 and "Traceback" not in out, out[-3000:]
    return outputs


@pytest.mark.parametrize("server", ["shared", "temporary"])
def test_two_runs_started_together_on_a_fresh_folder_both_succeed_and_are_recorded(tmp_path, prefect_api, server):
    """With one Prefect server, or each run starting its own on the same fresh Prefect home (their database
    migrations raced: a traceback in about 1 run of 3 pairs)."""
    project = tmp_path / "fresh"
    outputs = _two_together("train", {**TRAIN_CONFIG, "project_dir": str(project)}, tmp_path,
                            prefect_api if server == "shared" else None)
    recorded = _runs(project)
    parents = [r for r in recorded if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in recorded)
    for parent in parents:
        children = [r for r in recorded if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert {r.data.tags["rmens.stage"] for r in children} == {"prepare_models", "prepare_data", "train_ensemble"}
    trained = [r for r in recorded if r.data.tags.get("rmens.stage") == "train_ensemble"
               and r.data.tags.get("rmens.cache_hit") != "true"]
    assert len(trained) == 1, "one run trained, the other waited and reused it"
    # Recorded in Prefect's UI too: the Logs tab of a CLI run was empty when the CLI lowered Prefect's log
    # level to quiet the console (the records never reached Prefect's API handler); the console stays quiet.
    for parent, out in zip(parents, outputs):
        assert "train_ensemble:tiny" in out and "Beginning flow run" not in out and "Finished in state" not in out
        if server == "temporary":
            continue  # its logs went with the server the run started
        messages = [log.message for log in flow_run_logs(prefect_api, parent.data.tags["prefect.flow_run_id"])]
        assert any(m.startswith("Beginning flow run") for m in messages), messages
        assert any("train_ensemble:tiny" in m for m in messages) and "Finished in state Completed()" in messages


RETRAIN_CONFIG = {**TRAIN_CONFIG, "label": "nightly", "log_model": True, "registered_model": "rmens-retrain-race",
                  "data": {**TRAIN_CONFIG["data"], "val_fraction": 0.3}}


def test_two_retrains_started_together_register_one_version_and_one_records_its_promotion(tmp_path, prefect_api):
    """Both succeed and reuse one trained, registered version; exactly one records "promoted" and the other says
    the version was already decided (before, both could record it). test_pipeline checks that a rejected
    candidate moves only @candidate."""
    project = tmp_path / "retrain"
    outputs = _two_together("retrain", {**RETRAIN_CONFIG, "project_dir": str(project)}, tmp_path, prefect_api)
    results = [json.loads(out[out.index("{"):]) for out in outputs]
    assert sorted(r["decision"] for r in results) == ["already-decided", "promoted"], results
    assert {r["candidate_version"] for r in results} == {"1"}
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name='rmens-retrain-race'")] == ["1"]
    decisions = sorted(r.data.tags.get("rmens.decision") for r in _runs(project) if "rmens.decision" in r.data.tags)
    assert decisions == ["already-decided", "promoted"]
    assert client.get_registered_model("rmens-retrain-race").aliases == {"candidate": 1, "champion": 1, "nightly": 1}


def test_server_start_refuses_a_port_it_does_not_own_and_stop_never_signals_a_stranger(tmp_path):
    from flows.services import SERVER_PORT

    env = _env(tmp_path, None)
    with socket.socket() as squatter:
        try:
            squatter.bind(("127.0.0.1", SERVER_PORT))
        except OSError:
            pytest.skip(f"port {SERVER_PORT} is taken on this machine")
        squatter.listen()
        start = _rmens("server", "start", "--project-dir", str(tmp_path / "p"), env=env)
        out = _finish(start, 60)
    assert start.returncode == 1 and f"port {SERVER_PORT} is in use" in out, out

    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        pidfile = tmp_path / ".prefect" / "rmens-server.pid"
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(str(stranger.pid))
        stop = _rmens("server", "stop", "--project-dir", str(tmp_path / "p"), env=env)
        out = _finish(stop, 60)
        assert stop.returncode == 0 and "no rmens-started Prefect server" in out, out
        assert stranger.poll() is None, "server stop signalled a process that is not its server"
        assert not pidfile.exists()
    finally:
        stranger.kill()


@contextlib.contextmanager
def _captured(caplog, name: str):
    """caplog's handler on the named logger itself: Prefect's logging set-up replaces the root handlers."""
    logger = logging.getLogger(name)
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def _dead_process_identity() -> dict:
    from tasks.runtime.locks import process_identity

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    identity = process_identity(proc.pid)
    proc.kill()
    proc.wait()
    return identity


def test_a_lock_left_by_a_dead_process_is_taken_over_and_a_live_one_is_waited_on(tmp_path, caplog):
    import pydantic_core

    from tasks.runtime.locks import ProjectLockManager, process_identity

    manager = ProjectLockManager(lock_files_directory=tmp_path)
    (tmp_path / "ppo-dead.lock").write_bytes(pydantic_core.to_json(
        {"holder": "killed-run", "expiration": None, **_dead_process_identity()}))
    with _captured(caplog, "tasks.runtime.locks"):
        assert manager.acquire_lock("ppo-dead", holder="next-run", acquire_timeout=5)
    assert manager.is_lock_holder("ppo-dead", "next-run")
    assert "which is gone" in caplog.text and "taking it over" in caplog.text

    (tmp_path / "ppo-live.lock").write_bytes(pydantic_core.to_json(
        {"holder": "running", "expiration": None, **process_identity()}))
    caplog.clear()
    with _captured(caplog, "tasks.runtime.locks"):
        assert not manager.acquire_lock("ppo-live", holder="second", acquire_timeout=1)
    assert "waiting for ppo-live" in caplog.text and f"pid {os.getpid()}" in caplog.text


def test_a_lock_file_being_written_reads_as_locked(tmp_path):
    """Older lock files were created empty and filled later; a reader in between must wait, not fail."""
    import threading

    import pydantic_core

    from tasks.runtime.locks import ProjectLockManager

    lock = tmp_path / "key.lock"
    lock.write_bytes(b"")

    def fill():
        time.sleep(0.1)
        lock.write_bytes(pydantic_core.to_json({"holder": "first", "expiration": None}))

    writer = threading.Thread(target=fill)
    writer.start()
    manager = ProjectLockManager(lock_files_directory=tmp_path)
    assert manager.is_locked("key") and manager.is_lock_holder("key", "first")
    writer.join()


def test_runs_left_running_by_a_dead_process_are_closed_as_killed(tmp_path):
    from tasks.runtime.paths import ProjectPaths
    from tasks.runtime.tracking import close_orphaned_runs, setup

    paths = ProjectPaths.at(tmp_path)
    experiment = setup(paths)
    client = MlflowClient(paths.tracking_uri)
    dead = _dead_process_identity()
    orphan = client.create_run(experiment, tags={"rmens.host": dead["host"], "rmens.pid": str(dead["pid"]),
                                                 "rmens.pid_started": str(dead["started"])}).info.run_id
    live = client.create_run(experiment, tags={"rmens.host": socket.gethostname(), "rmens.pid": str(os.getpid()),
                                               "rmens.pid_started": str(psutil.Process().create_time())}).info.run_id
    assert close_orphaned_runs(client, experiment) == [orphan]
    assert client.get_run(orphan).info.status == "KILLED" and client.get_run(live).info.status == "RUNNING"


def _counting_step(name: str, builds: list, content: bytes = b"\1" * 64, resumable: bool = False):
    from rmens.steps import step

    def build(folder: Path, *, x: int) -> dict:
        builds.append(sorted(p.name for p in folder.iterdir()))
        (folder / "weights.bin").write_bytes(content)
        return {"x": x}

    build.__qualname__ = f"build_{name}"
    return step(name, resumable=resumable)(build)


def test_a_changed_output_is_rebuilt_not_reused_and_refresh_rebuilds(tmp_path, caplog):
    """The one store's rule, which every runner follows: reuse a finished, intact folder of the same key;
    compute again one whose files changed, whose done.json is unreadable, or that --refresh names."""
    from rmens.steps import Store

    builds: list = []
    step = _counting_step("test_changed", builds)
    store = Store(tmp_path)
    first, computed = store.run(step, {"x": 1})
    assert computed and store.run(step, {"x": 1}) == (first, False) and len(builds) == 1
    (first.folder / "weights.bin").write_bytes(b"\2" * 64)  # same size, new content
    with _captured(caplog, "rmens.steps.store"):
        again, computed = store.run(step, {"x": 1})
    assert computed and len(builds) == 2 and again.folder == first.folder
    assert "changed since it was made" in caplog.text and "weights.bin" in caplog.text
    (first.folder / "done.json").write_bytes(b"\xff\xfe")  # an unreadable marker: rebuilt, not a crash
    assert store.run(step, {"x": 1})[1] and len(builds) == 3
    assert store.run(step, {"x": 1}, refresh=True)[1] and len(builds) == 4  # --refresh: a complete, intact folder
    assert store.run(step, {"x": 2})[0].folder != first.folder  # another input: another key and folder


def _flip_a_byte_keeping_size_and_mtime(path: Path) -> None:
    stat, data = path.stat(), bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_verify_finds_bytes_changed_without_a_new_size_or_mtime_and_fix_recomputes_them(tmp_path, monkeypatch):
    """Reuse trusts size and mtime; `rmens verify` reads everything: a flipped byte in a stored output and in
    a data file whose hash is remembered are both named (exit 1); --fix makes exactly those recompute."""
    from rmens.cli import main as lib_main
    from rmens.steps import Store
    from rmens.steps.content import content_digests

    monkeypatch.setenv("RMENS_CACHE", str(tmp_path / "cache"))
    builds: list = []
    step, store = _counting_step("test_verify", builds), Store(tmp_path / "project" / "artifacts")
    output, _ = store.run(step, {"x": 1})
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    remembered = content_digests([data])
    assert lib_main(["verify", str(tmp_path / "project")]) == 0

    _flip_a_byte_keeping_size_and_mtime(output.folder / "weights.bin")
    _flip_a_byte_keeping_size_and_mtime(data)
    assert store.run(step, {"x": 1})[1] is False and content_digests([data]) == remembered, "unseen by a stat"
    assert lib_main(["verify", str(tmp_path / "project")]) == 1
    assert lib_main(["verify", "--fix", str(tmp_path / "project")]) == 0
    assert not (output.folder / "started.json").exists(), "not resumed from the damaged files"
    assert store.run(step, {"x": 1})[1] is True and len(builds) == 2, "the damaged step computes again"
    assert content_digests([data]) != remembered, "the steps reading the file get a new key"
    assert lib_main(["verify", str(tmp_path / "project")]) == 0


def test_an_unfinished_folder_is_resumed_only_by_a_resumable_step(tmp_path):
    from rmens.steps import Store, step_key

    builds: list = []
    store = Store(tmp_path)
    for name, resumable in (("test_fresh", False), ("test_resumes", True)):
        declared = _counting_step(name, builds, resumable=resumable)
        folder = store.folder(declared, step_key(declared, {"x": 1}))
        folder.mkdir(parents=True)
        (folder / "started.json").write_text(json.dumps({"key": step_key(declared, {"x": 1})}))
        (folder / "checkpoint").write_text("half")  # what a killed run left
        store.run(declared, {"x": 1})
    assert builds == [["started.json"], ["checkpoint", "started.json"]]


def test_sigterm_to_rmens_ui_stops_the_mlflow_server_it_started(tmp_path):
    from tasks.runtime.paths import ProjectPaths
    from tasks.runtime.tracking import setup

    setup(ProjectPaths.at(tmp_path / "p"))  # a store to show
    port = free_port()
    ui = _rmens("ui", "--project-dir", str(tmp_path / "p"), "--port", str(port), env=_env(tmp_path, None))
    wait_for(lambda: answers(f"http://127.0.0.1:{port}/health") or ui.poll() is not None, 120, "the MLflow UI")
    children = psutil.Process(ui.pid).children(recursive=True)
    assert children and ui.poll() is None
    ui.send_signal(signal.SIGTERM)
    _finish(ui, 60)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


def test_a_store_a_run_was_killed_writing_to_is_recovered_not_set_aside(tmp_path, caplog):
    """A kill in the middle of an MLflow write leaves SQLite's hot journal beside a complete store: the next
    run's check rolls it back and keeps the store (the kill sweep found it moved aside, and the journal then
    corrupting the new one)."""
    from tasks.runtime.paths import ProjectPaths
    from tasks.runtime.tracking import setup

    paths = ProjectPaths.at(tmp_path).make()
    experiment = setup(paths)
    writer = ("import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
              "db.execute('PRAGMA cache_size=1'); db.execute('BEGIN EXCLUSIVE'); "
              "db.execute('CREATE TABLE filler (x BLOB)'); "
              "[db.execute('INSERT INTO filler VALUES (zeroblob(100000))') for _ in range(50)]; "
              "print('writing', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(paths.mlflow_db)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert paths.mlflow_db.with_name("mlflow.db-journal").is_file(), "the scenario needs a hot journal"
    with _captured(caplog, "tasks.runtime.tracking"):
        assert setup(paths) == experiment
    assert "half-built" not in caplog.text and not list(tmp_path.glob("mlflow.db.incomplete-*"))
    assert MlflowClient(paths.tracking_uri).get_experiment(experiment).name == f"rmens-{tmp_path.name}"


def test_a_store_half_built_by_a_killed_run_is_set_aside_and_made_again(tmp_path, caplog):
    """What a kill during MLflow's first migrations used to leave: tables but no schema stamp. The next run
    moves it aside (nothing is deleted) and makes a working store."""
    import sqlite3

    from tasks.runtime.paths import ProjectPaths
    from tasks.runtime.tracking import setup

    paths = ProjectPaths.at(tmp_path).make()
    with sqlite3.connect(paths.mlflow_db) as db:
        db.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
    with _captured(caplog, "tasks.runtime.tracking"):
        experiment = setup(paths)
    assert MlflowClient(paths.tracking_uri).get_experiment(experiment).name == f"rmens-{tmp_path.name}"
    assert "half-built" in caplog.text and len(list(tmp_path.glob("mlflow.db.incomplete-*"))) == 1


def test_a_kill_while_the_store_is_first_made_never_bricks_the_project(tmp_path):
    """SIGKILL at a spread of instants while a fresh project's MLflow store is being created (the window the
    probe found: 7 of 18 kills left a store every later run failed on); each time the next setup works."""
    code = ("import sys, time; from tasks.runtime.paths import ProjectPaths; from tasks.runtime.tracking import setup; "
            "print('ready', flush=True); setup(ProjectPaths.at(sys.argv[1])); print('done', flush=True); "
            "time.sleep(30)")
    from tasks.runtime.paths import ProjectPaths
    from tasks.runtime.tracking import setup

    for delay in (0.1, 0.4, 0.8):
        project = tmp_path / f"after-{delay}"
        proc = subprocess.Popen([sys.executable, "-c", code, str(project)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "MLFLOW_TRACKING_URI": ""})
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        paths = ProjectPaths.at(project)
        assert MlflowClient(paths.tracking_uri).get_experiment(setup(paths)) is not None, delay


def test_a_lock_holder_killed_but_not_yet_reaped_counts_as_gone():
    from tasks.runtime.locks import holder_is_gone

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = round(psutil.Process(child.pid).create_time(), 2)
    wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 30, "the child to exit unreaped")
    try:
        assert holder_is_gone({"host": socket.gethostname(), "pid": child.pid, "started": started})
    finally:
        child.wait()
    assert not holder_is_gone({"host": socket.gethostname(), "pid": os.getpid(),
                               "started": round(psutil.Process().create_time(), 2)})


def test_the_prefect_server_refuses_writes_from_other_web_pages(prefect_api):
    """What a browser does before a page's cross-origin JSON write (every Prefect API write): a preflight. The
    server started with rmens' settings refuses a foreign page's and allows its own UI's origin."""
    import urllib.error
    import urllib.request

    from flows.services import SERVER_ORIGINS

    def preflight(origin: str):
        request = urllib.request.Request(f"{prefect_api}/flow_runs/", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers.get("access-control-allow-origin")
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("access-control-allow-origin")

    assert preflight("http://evil.example") == (400, None)
    own = SERVER_ORIGINS.split(",")[0]
    assert preflight(own) == (200, own)


def test_server_start_takes_a_port_and_runs_find_it_there(tmp_path):
    env = _env(tmp_path, None)
    port = free_port()
    args = ("--project-dir", str(tmp_path / "p"))
    start = _rmens("server", "start", "--port", str(port), *args, env=env)
    try:
        out = _finish(start, 120)
        assert start.returncode == 0 and f"http://127.0.0.1:{port}" in out, out
        status = _rmens("server", "status", *args, env=env)
        assert f"running at http://127.0.0.1:{port}/api" in _finish(status, 60)
        # Its UI calls the API on that port (with Prefect's default it called 4200: "Can't connect to Server API")
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/api/health"), 120, "the server to answer")
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as response:
            assert json.loads(response.read())["api_url"] == f"http://127.0.0.1:{port}/api"
    finally:
        stop = _rmens("server", "stop", *args, env=env)
        assert "stopped the Prefect server" in _finish(stop, 60)


def test_progress_lines_number_each_call_of_the_plan(tmp_path, caplog):
    from rmens.steps import Store
    from rmens.steps.runner import LocalRunner, check

    builds: list = []
    first, second = _counting_step("test_progress_a", builds), _counting_step("test_progress_b", builds)

    def plan(call):
        call(first, "one", x=1)
        call(second, "two", x=2)

    store = Store(tmp_path)
    runner = LocalRunner(store, total=len(check(plan, store).outputs))
    caplog.set_level(logging.INFO, logger="rmens.progress")
    plan(runner)
    plan(LocalRunner(store, total=2))
    lines = [record.getMessage() for record in caplog.records if record.name == "rmens.progress"]
    assert len(lines) == 8
    assert lines[0].startswith("[1/2 0:00] test_progress_a:one") and lines[0].endswith("started")
    assert lines[3].startswith("[2/2 0:00] test_progress_b:two") and "computed in" in lines[3]
    assert lines[-1].startswith("[2/2 0:00] test_progress_b:two") and lines[-1].endswith("reused")


def test_a_long_step_says_how_far_it_is_between_its_start_and_end_lines(tmp_path, caplog, monkeypatch):
    """The metrics a running step reports reach the runner's progress line (at most every `interval` seconds)
    and still reach the tracker's sink around them."""
    from rmens.steps import Store, report_metrics, step
    from rmens.steps.contract import metrics_to
    from rmens.steps.runner import LocalRunner, Progress

    def build(folder: Path, *, n: int) -> dict:
        for i in range(1, n + 1):
            report_metrics(i, {"train/loss": 1 / i, "train/lr": 0.1})
        return {}

    build.__qualname__ = "build_test_working"
    long_step = step("test_working")(build)
    monkeypatch.setattr(Progress, "interval", 0.0)
    tracked = []
    caplog.set_level(logging.INFO, logger="rmens.progress")
    with metrics_to(lambda number, metrics: tracked.append(number)):
        LocalRunner(Store(tmp_path), total=1)(long_step, "arm", n=3)
    lines = [record.getMessage() for record in caplog.records if record.name == "rmens.progress"]
    assert [line.split("test_working:arm")[1].strip() for line in lines[1:4]] == [
        "at step 1 (train/loss 1, train/lr 0.1)", "at step 2 (train/loss 0.5, train/lr 0.1)",
        "at step 3 (train/loss 0.3333, train/lr 0.1)"]
    assert tracked == [1, 2, 3]
