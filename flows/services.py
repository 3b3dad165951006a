"""Local services the `rmens` command manages: a persistent Prefect server (`rmens server start|stop|status`),
the MLflow UI (`rmens ui`), and the check that servers a user points at answer before any work starts.

Each service runs in its own session (process group), so that stopping it stops its workers too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SERVER_PORT = 4200
SERVER_ORIGINS = f"http://127.0.0.1:{SERVER_PORT},http://localhost:{SERVER_PORT}"  # its UI's origins


def _server_pidfile() -> Path:
    return Path(os.environ.get("PREFECT_HOME", "runs/.prefect")).resolve() / "rmens-server.pid"


def _our_server_pid() -> int | None:
    """The pid in the pidfile, if that process is alive and is a Prefect server (a pid may be reused)."""
    import psutil

    pidfile = _server_pidfile()
    try:
        pid = int(pidfile.read_text().split()[0])
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return pid if "prefect" in cmdline and "server" in cmdline else None


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
    url = f"http://127.0.0.1:{SERVER_PORT}/api"
    return url if _our_server_pid() is not None and _answers(f"{url}/health", timeout=2) is None else None


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


def manage_server(action: str) -> int:
    """`rmens server start|stop|status`: a Prefect server on SERVER_PORT in its own session, its pid in
    $PREFECT_HOME/rmens-server.pid (its log beside it); stop signals only the server that start left there."""
    pidfile = _server_pidfile()
    pid = _our_server_pid()
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
    if pid is not None:
        print(f"already running (pid {pid}): export PREFECT_API_URL=http://127.0.0.1:{SERVER_PORT}/api")
        return 0
    if not _port_free(SERVER_PORT):
        print(f"rmens: error: port {SERVER_PORT} is in use by another program (another project's Prefect server?); "
              f"stop it, or use it: export PREFECT_API_URL=http://127.0.0.1:{SERVER_PORT}/api", file=sys.stderr)
        return 1
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    log = open(pidfile.with_suffix(".log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(SERVER_PORT)], stdout=log, stderr=log, start_new_session=True)
    pidfile.write_text(str(proc.pid))
    for _ in range(120):
        # Ours only while our process is alive: a health answer from a server that took the port
        # meanwhile must not count.
        if proc.poll() is None and running_server_url():
            print(f"Prefect server up (pid {proc.pid}); `rmens run` uses it automatically, or "
                  f"export PREFECT_API_URL=http://127.0.0.1:{SERVER_PORT}/api")
            return 0
        if proc.poll() is not None:
            break
        time.sleep(1)
    pidfile.unlink(missing_ok=True)
    print(f"the server did not come up; see {pidfile.with_suffix('.log')}", file=sys.stderr)
    return 1


def mlflow_ui(tracking_uri: str, port: int, workers: int) -> int:
    """The MLflow UI on a tracking store until it exits or this process is stopped; its exit status."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    print(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C to stop)")
    # Its own session, stopped with all its workers however this process ends (Ctrl-C, SIGTERM).
    proc = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, start_new_session=True)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
