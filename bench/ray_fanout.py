"""The smoke pipeline computed from scratch in one process and on `--ray local:gpus=N`, side by side against
the same running Prefect API: wall time of each `rmens run` process, and the most steps that ran at once
under Ray (from the steps' MLflow runs: start and end times and the granted devices).

    python bench/ray_fanout.py               # 2 declared devices
    python bench/ray_fanout.py --gpus 4

On a machine without accelerators the declared devices only bound how many steps run at once; every step
still computes on the CPU cores, which the concurrent steps then share. Results: bench/out/ray_fanout.json
and .txt.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline_cache import free_port, timed_run, wait_healthy
from results import save_results


def most_at_once(project: Path) -> tuple[int, list[str]]:
    """The most computed steps whose MLflow runs overlapped in time, and the devices they were granted."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name(f"rmens-{project.name}")
    runs = [r for r in client.search_runs([experiment.experiment_id], max_results=1000)
            if "rmens.devices" in r.data.tags and r.info.end_time]
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak, sorted({r.data.tags["rmens.devices"] for r in runs})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="devices declared to the local Ray")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rmens-bench-ray-"))
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("RAY_ADDRESS", None)
    (tmp / "prefect").mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url)
        env["PREFECT_API_URL"] = url
        run = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke"]
        one_process, _ = timed_run([*run, "--set", f"project_dir={tmp / 'sequential'}"], env)
        on_ray, _ = timed_run([*run, "--set", f"project_dir={tmp / 'ray'}", "--ray", f"local:gpus={args.gpus}"], env)
        again, _ = timed_run([*run, "--set", f"project_dir={tmp / 'ray'}", "--ray", f"local:gpus={args.gpus}",
                              "--record"], env)
    finally:
        server.terminate()
        server.wait(30)
    peak, devices = most_at_once(tmp / "ray")
    result = {"gpus_declared": args.gpus, "cpu_cores": os.cpu_count(), "one_process_s": one_process,
              "ray_s": on_ray, "ratio": on_ray / one_process, "ray_recorded_rerun_s": again,
              "most_steps_at_once": peak, "devices_granted": devices}
    lines = [f"smoke pipeline from scratch, {os.cpu_count()} CPU cores, {args.gpus} declared devices:",
             f"  one process {one_process:.1f} s; --ray local:gpus={args.gpus} {on_ray:.1f} s "
             f"(ratio {on_ray / one_process:.2f}); at most {peak} steps at once, devices {devices}",
             f"  unchanged re-run on Ray with --record (every step served from the store): {again:.1f} s"]
    save_results("ray_fanout", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
