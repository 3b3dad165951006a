"""The smoke pipeline run three times against a Prefect API that is already up: first, then with nothing
changed (which must take at most 10% of the first), then with nothing changed but `--record`, which runs
the flow anyway so that every stage is a Prefect cache hit recorded in MLflow. Prefect's temporary local
server (what a run without PREFECT_API_URL starts) is timed separately, as is a persistent server's start-up.

    python bench/pipeline_cache.py

Each run is a fresh `rmens run` process (imports included), as a user would type it; the flow's own
time (what `rmens run` reports) is shown next to it. Results: bench/out/pipeline_cache.json and .txt.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from results import save_results

TRIVIAL_FLOW = "from prefect import flow\n@flow\ndef f():\n    return 1\nf()\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 180) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"no Prefect API at {url}")


def timed_run(cmd: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return elapsed, done.stdout + done.stderr


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rmens-bench-"))
    base_env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    base_env.pop("PREFECT_API_URL", None)
    (tmp / "prefect").mkdir()
    ephemeral, _ = timed_run([sys.executable, "-c", TRIVIAL_FLOW], base_env)

    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=base_env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        server_start = wait_healthy(url)
        env = {**base_env, "PREFECT_API_URL": url}
        with_server, _ = timed_run([sys.executable, "-c", TRIVIAL_FLOW], env)
        cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--set", f"project_dir={tmp / 'smoke'}"]
        first, out1 = timed_run(cmd, env)
        second, out2 = timed_run(cmd, env)
        recorded, out3 = timed_run([*cmd, "--record"], env)
    finally:
        server.terminate()
        server.wait(30)

    def flow_seconds(text: str) -> float:
        return float(re.search(r"finished in ([\d.]+) s", text).group(1))

    def stages(text: str) -> str:
        return re.search(r"steps: (\d+ \((\d+ served from Prefect's cache|all up to date))", text).group(1) + ")"

    result = {
        "ephemeral_trivial_flow_s": ephemeral, "server_trivial_flow_s": with_server,
        "ephemeral_startup_cost_s": ephemeral - with_server, "persistent_server_startup_s": server_start,
        "first_run_s": first, "second_run_s": second, "ratio": second / first,
        "recorded_run_s": recorded, "recorded_ratio": recorded / first,
        "first_flow_s": flow_seconds(out1), "recorded_flow_s": flow_seconds(out3),
        "first_stages": stages(out1), "second_stages": stages(out2), "recorded_stages": stages(out3),
    }
    lines = [
        f"Prefect temporary local server: a trivial flow takes {ephemeral:.1f} s without an API vs "
        f"{with_server:.1f} s against a running one -> start-up cost {ephemeral - with_server:.1f} s",
        f"persistent `prefect server start`: healthy after {server_start:.1f} s (once)",
        f"smoke pipeline, API already up: first run {first:.1f} s (flow {result['first_flow_s']:.0f} s, "
        f"{result['first_stages']}); unchanged re-run {second:.2f} s ({result['second_stages']}); "
        f"unchanged re-run with --record {recorded:.1f} s (flow {result['recorded_flow_s']:.1f} s, "
        f"{result['recorded_stages']})",
        f"unchanged re-run / first run = {result['ratio']:.3f} as a process (target <= 0.10: "
        f"{'met' if result['ratio'] <= 0.10 else 'NOT met'})",
        f"with --record (through Prefect and MLflow): {result['recorded_ratio']:.2f} as a process, "
        f"{result['recorded_flow_s'] / result['first_flow_s']:.2f} flow time only",
    ]
    save_results("pipeline_cache", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
