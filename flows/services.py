"""Local services the `rmens` command manages: a persistent Prefect server (`rmens server start|stop|status`),
a temporary one for a run when there is none, the MLflow UI (`rmens ui`), and the check that servers a user
points at answer before any work starts.

Each service runs in its own session (process group), so that stopping it stops its workers too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

SERVER_PORT = 4200  # `rmens server start`'s default (--port)


def origins(port: int) -> str:
    """The origins of a local server's own UI: the only web pages allowed to call its API."""
    return f"http://127.0.0.1:{port},http://localhost:{port}"


SERVER_ORIGINS = origins(SERVER_PORT)


def _server_pidfile() -> Path:
    return Path(os.environ.get("PREFECT_HOME", "runs/.prefect")).resolve() / "rmens-server.pid"


def _our_server() -> tuple[int, int] | None:
    """(pid, port) from the pidfile, if that process is alive and is a Prefect server (a pid may be reused)."""
    import psutil

    pidfile = _server_pidfile()
    try:
        fields = pidfile.read_text().split()
        pid, port = int(fields[0]), int(fields[1]) if len(fields) > 1 else SERVER_PORT
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return (pid, port) if "prefect" in cmdline and "server" in cmdline else None


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def running_server_url() -> str | None:
    """The URL of the server started by `rmens server start`, if that process is alive and answers."""
    ours = _our_server()
    url = f"http://127.0.0.1:{ours[1]}/api" if ours else None
    return url if url and _answers(f"{url}/health", timeout=2) is None else None


def _answers(url: str, timeout: float = 5) -> str | None:
    """None when `url` answers HTTP 200, else why not."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except OSError as err:
        return str(getattr(err, "reason", err))


def without_credentials(url: str) -> str:
    """`url` fit to print: a user and password inside it (https://user:token@host) shown as ***."""
    import re

    return re.sub(r"(?<=://)[^/@]+@", "***@", url)


def check_servers() -> None:
    """Servers the user pointed us at must answer before any work starts, not after the first stage."""
    prefect = os.environ.get("PREFECT_API_URL")
    if prefect and (why := _answers(f"{prefect.rstrip('/')}/health")):
        raise ValueError(f"PREFECT_API_URL={without_credentials(prefect)} does not answer ({why}); start it "
                         "(rmens server start) or unset PREFECT_API_URL to use a temporary local server")
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if mlflow_uri.startswith(("http://", "https://")) and (why := _answers(f"{mlflow_uri.rstrip('/')}/health")):
        raise ValueError(f"MLFLOW_TRACKING_URI={without_credentials(mlflow_uri)} does not answer ({why}); start "
                         "the MLflow server or unset MLFLOW_TRACKING_URI to use the project's own store")


def _start_server(port: int, log, **popen) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:`port` in its own session (so stopping it stops its workers too),
    its output in `log`. Its UI calls the API on that port (Prefect's default, 4200, left the UI of a server
    on any other port saying "Can't connect to Server API"), and only pages of that UI may call it."""
    env = {**os.environ, "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": origins(port)}
    return subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=log, start_new_session=True, env=env, **popen)


def manage_server(action: str, port: int = SERVER_PORT) -> int:
    """`rmens server start|stop|status`: a Prefect server on `port` in its own session, its pid and port in
    $PREFECT_HOME/rmens-server.pid (its log beside it); stop signals only the server that start left there."""
    pidfile = _server_pidfile()
    ours = _our_server()
    pid = ours[0] if ours else None
    if action == "status":
        url = running_server_url()
        print(f"running at {url} (pid {pid})" if url else "not running")
        return 0
    if action == "stop":
        if pid is not None:
            os.killpg(pid, signal.SIGTERM)  # the server and its workers: it was started in its own session
            print(f"stopped the Prefect server (pid {pid})")
        else:
            print("no rmens-started Prefect server is running" + (" (removed a stale pidfile)" if pidfile.is_file()
                                                                     else ""))
        pidfile.unlink(missing_ok=True)
        return 0
    if ours is not None:
        print(f"already running (pid {pid}): export PREFECT_API_URL=http://127.0.0.1:{ours[1]}/api")
        return 0
    if not _port_free(port):
        print(f"rmens: error: port {port} is in use by another program (another project's Prefect server?); "
              f"choose another with --port, or use it: export PREFECT_API_URL=http://127.0.0.1:{port}/api",
              file=sys.stderr)
        return 1
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    log = open(pidfile.with_suffix(".log"), "ab")
    proc = _start_server(port, log)
    pidfile.write_text(f"{proc.pid} {port}")
    for _ in range(120):
        # Ours only while our process is alive: a health answer from a server that took the port
        # meanwhile must not count.
        if proc.poll() is None and running_server_url():
            print(f"Prefect server up at http://127.0.0.1:{port} (pid {proc.pid}); `rmens run` uses it "
                  f"automatically, or export PREFECT_API_URL=http://127.0.0.1:{port}/api")
            return 0
        if proc.poll() is not None:
            break
        time.sleep(1)
    pidfile.unlink(missing_ok=True)
    print(f"the server did not come up; see {pidfile.with_suffix('.log')}", file=sys.stderr)
    return 1


def runs_table_url(experiment_id: str, port: int = 5000, view: str | None = None) -> str:
    """The page of MLflow's UI that lists an experiment's runs (the default page of an experiment may be
    another tab, e.g. traces), in the shared view `view` when the pipeline left one (tasks.publish)."""
    return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs" + (
        f"?viewStateShareKey={view}" if view else "")


def mlflow_ui(tracking_uri: str, port: int, workers: int, experiment_id: str | None = None,
              view: str | None = None) -> int:
    """The MLflow UI on a tracking store until it exits or this process is stopped; its exit status."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    page = runs_table_url(experiment_id, port, view) if experiment_id else f"http://127.0.0.1:{port}"
    print(f"MLflow UI on {page} (Ctrl-C to stop)")
    # Its own session, stopped with all its workers however this process ends (Ctrl-C, SIGTERM).
    proc = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, start_new_session=True)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process (Linux): SIGTERM when the run that started it dies, even by SIGKILL, so that a
    killed run never leaves a server behind in its own session."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to a service's session, SIGKILL after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """PREFECT_API_URL for the block: the configured or running server's, else a temporary server of this run.

    The temporary server runs in its own session. Prefect's own temporary server is a child in the run's
    process group, so a Ctrl-C or SIGTERM to the group (what a terminal or a supervisor sends) killed it first
    and the run could record nothing (it failed after about 75 s with a connection error); this one keeps
    answering while the run marks its MLflow runs KILLED and releases its locks, and is stopped last."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    home = Path(os.environ.get("PREFECT_HOME", "runs/.prefect")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "temporary-server.log"
    # One server starts at a time per Prefect home: each migrates the shared database as it starts, and two
    # runs started together on a fresh folder raced ("duplicate column name"), one failing with a traceback.
    with FileLock(home / "temporary-server.lock"):
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        with log_path.open("ab") as log:
            proc = _start_server(port, log, preexec_fn=_die_with_parent)
        try:
            _wait_until_up(proc, url, log_path)
        except BaseException:
            stop_group(proc)
            raise
    try:
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        _drain_to_api()
        if os.environ.get("PREFECT_API_URL") == url:
            del os.environ["PREFECT_API_URL"]
        stop_group(proc)


def _wait_until_up(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
    while _answers(f"{url}/health", timeout=2) is not None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the temporary Prefect server did not come up; see {log_path}")
        time.sleep(0.3)


def _drain_to_api(timeout: float = 5) -> None:
    """Send Prefect's queued logs and events while the server still answers: its workers otherwise flush at
    exit, after the server is gone, and print a connection error under the run's last line."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)
