"""The README's screenshots, taken as a user sees the pages: a smoke run recorded in a local Prefect server,
then headless Chromium on MLflow's runs table, its chart view and Prefect's flow-run page.

    apt-get install chromium                                  # the browser (Debian's)
    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    /tmp/pw/bin/python docs/screenshots.py [--rmens .venv/bin/rmens] [--out docs]

Playwright drives the system Chromium (no browser download). Everything runs on 127.0.0.1 in a temporary
folder; the PNGs go to docs/.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds} s")


def post(url: str, body: dict) -> object:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rmens", default=str(ROOT / ".venv" / "bin" / "rmens"))
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="rmens-screens-"))
    python = str(Path(args.rmens).parent / "python")
    prefect_port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"), "RMENS_HOME": str(work)}
    env.pop("PREFECT_API_URL", None)
    services = [subprocess.Popen([args.rmens, "server", "start", "--port", str(prefect_port), "--project-dir",
                                  str(work / "smoke")], env=env, cwd=ROOT)]
    try:
        services[0].wait(timeout=180)
        api = f"http://127.0.0.1:{prefect_port}/api"
        wait_for(f"{api}/health")
        subprocess.run([args.rmens, "run", "--set", f"project_dir={work / 'smoke'}"], check=True, cwd=ROOT,
                       env={**env, "PREFECT_API_URL": api})
        services.append(subprocess.Popen(
            [python, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{work / 'smoke' / 'mlflow.db'}",
             "--host", "127.0.0.1", "--port", str(mlflow_port)], env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        mlflow = f"http://127.0.0.1:{mlflow_port}"
        wait_for(f"{mlflow}/health")
        experiments = post(f"{mlflow}/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
        experiment = next(e["experiment_id"] for e in experiments if e["name"] == "rmens-smoke")
        flow_run = post(f"{api}/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})[0]["id"]
        pages = {"mlflow-runs.png": f"{mlflow}/#/experiments/{experiment}/runs?viewStateShareKey=rmens",
                 "mlflow-charts.png": f"{mlflow}/#/experiments/{experiment}/runs?compareRunsMode=CHART",
                 "prefect-flow-run.png": f"http://127.0.0.1:{prefect_port}/runs/flow-run/{flow_run}"}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            for name, url in pages.items():
                page.goto(url, wait_until="load", timeout=120_000)
                page.wait_for_timeout(8000)  # the pages render after their data arrives (both keep polling)
                page.screenshot(path=str(Path(args.out) / name))
                print(f"{name}: {url}")
            browser.close()
    finally:
        for service in services[1:]:
            os.killpg(service.pid, signal.SIGTERM)
        subprocess.run([args.rmens, "server", "stop", "--project-dir", str(work / "smoke")], env=env, cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
