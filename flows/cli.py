"""The `rmens` command: the orchestrating commands (Prefect flows, MLflow UI, a local Prefect server) and
the library's own commands (rmens/cli.py).

    rmens run [--preset smoke|cpu|gpu] [--config FILE] [--set KEY=VALUE ...]   the whole pipeline (Prefect + MLflow)
    rmens ui [--preset ...]                                                     MLflow UI on the project's store
    rmens server start|stop|status                                              a persistent local Prefect API
    rmens experiment [--size tiny|cpu|gpu-check|gpu] [--eval-data DIR] [--out DIR]  the reference experiment
    rmens flow train|evaluate|retrain --config FILE                             the other flows
    rmens train / ppo / calibrate                                               single stages, no Prefect/MLflow
    rmens prepare-model NAME                                                    convert/build a model alias once
    rmens serve FOLDER|models:/NAME@ALIAS [--rule lcb1] [--port P]              the reward over HTTP
    rmens verify FOLDER [--fix]                                                 re-hash every file of a store

It lives with the flows because it runs them; the flows are imported only once the environment they
read at import (project folders, telemetry off) is set. The local services it starts, stops or checks (the
Prefect server, the MLflow UI) are flows/services.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from flows.entry import CONSOLE_ENV, quiet_console
from flows.services import (
    SERVER_ORIGINS,
    SERVER_PORT,
    check_servers,
    manage_server,
    mlflow_ui,
    prefect_api,
    running_server_url,
    runs_table_url,
)
from rmens.cli import add_library_commands, config_args, job_config, run_command
from rmens.config import apply_overrides, load_yaml, merge
from rmens.presets import PRESETS as BUILT_IN
from rmens.presets import preset_data

PRESETS = BUILT_IN["pipeline"]  # name -> what it is


def pipeline_config(args):
    from rmens.pipeline.config import PipelineConfig

    data = preset_data(args.preset)
    if args.config:  # layered over the preset: nested sections merge, so `ppo: {steps: 3}` keeps ppo.lr
        data = merge(data, load_yaml(args.config))
    return PipelineConfig.model_validate(apply_overrides(data, args.set or []))


# What the servers rmens starts read (the console's settings are flows.entry's, which every flow shares; the
# tests use both).
QUIET_ENV = {
    **CONSOLE_ENV,
    # Prefect's server allows every origin by default, so any web page could create flow runs that a polling
    # worker would execute; the servers rmens starts (temporary or `rmens server start`) answer only pages
    # of their own UI's origin (a browser preflights every JSON write and gets a 400 from elsewhere).
    "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": SERVER_ORIGINS,
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def prepare_environment(project_dir: str, announce: bool = True) -> None:
    """Settings Prefect and MLflow read at import: keep their state in the project, no telemetry."""
    quiet_console()  # after logging.basicConfig (rmens.cli.run_command): its handler is the console
    home = Path(os.environ.get("RMENS_HOME", Path(project_dir).parent)).resolve()
    os.environ.setdefault("PREFECT_HOME", str(home / ".prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "PREFECT_API_URL" not in os.environ:
        url = running_server_url()
        if url:
            os.environ["PREFECT_API_URL"] = url
        elif announce:
            logging.info("no Prefect API: starting a temporary local server (a few seconds); "
                         "`rmens server start` keeps one running for faster repeated runs")


def cmd_server(args) -> int:
    prepare_environment(args.project_dir, announce=False)
    return manage_server(args.action, args.port)


def cmd_run(args) -> int:
    config = pipeline_config(args)
    from rmens.preflight import check_before_work

    check_before_work(config)  # here as well as in the flow: before a temporary server starts
    check_ray_settings(config, args.ray)
    from rmens.pipeline.plan import run_pipeline
    from rmens.steps import Store
    from rmens.steps.graph import record
    from tasks.runtime.paths import ProjectPaths

    paths = ProjectPaths.at(config.project_dir)
    # Every step's key is known before anything runs: the plan keyed once serves every check below
    nodes, _ = record(run_pipeline, Store.of_project(paths.root), config)
    check_resources(config.resources, nodes)
    if args.dry_run:
        return print_placement(nodes, args.device_memory_gib, config.resources)
    if not (args.refresh or args.record) and all(node.found is not None for node in nodes.values()):
        # nothing would run: say so without paying for Prefect and MLflow
        report = nodes["report:report"].found
        _print_run_summary(config.name, args.preset, paths, report.file("report"),
                           f"MLflow run {report.run_id} made the report", f"{len(nodes)} (all up to date: "
                           "nothing ran; --record runs them through Prefect as cache hits)")
        return 0
    budget = device_budget(args.device_memory_gib)  # (imports torch: not for an up-to-date re-run)
    if budget is not None:
        from rmens.memory import check_fit

        check_fit(nodes, budget, devices_of(config.resources))
    check_servers()
    prepare_environment(config.project_dir)
    start = time.perf_counter()
    with prefect_api():
        from flows.pipeline import pipeline

        result = on_ray(pipeline, args.ray)(config=config, refresh=args.refresh)
    cached = sum(1 for s in result["states"].values() if s == "Cached")
    _print_run_summary(config.name, args.preset, paths, result["report"], f"parent run {result['parent_run_id']}",
                       f"{len(result['states'])} ({cached} served from Prefect's cache)",
                       time.perf_counter() - start, result.get("experiment_id"))
    return 0


def check_resources(resources: dict, nodes: dict) -> None:
    """A `resources` key that names no step or call of the plan (a recorded graph), or gives several devices to a
    step that does not shard, is refused before anything runs."""
    from rmens.steps.resources_config import unknown_keys, unshardable

    unknown = unknown_keys(resources, list(nodes))
    if unknown:
        raise ValueError(f"resources: {', '.join(unknown)} names no step or call of this plan")
    one = unshardable(resources)
    if one:
        raise ValueError(f"resources: {', '.join(one)} asks for more than one device, but only the training steps "
                         "shard (one FSDP2 rank per device); give it one")
    from rmens.training.config import TrainConfig, check_divisible

    placed = devices_of(resources)
    for name, node in nodes.items():  # a sharded step's batches must split over its devices: said now, not hours in
        devices = placed(node)
        train = next((value for value in node.inputs.values() if isinstance(value, TrainConfig)), None)
        if devices > 1 and train is not None and node.step.resources.shards:
            try:
                check_divisible(devices, train)
            except ValueError as err:
                raise ValueError(f"resources: {name}: {err}") from None


def check_ray_settings(config, flag: str | None) -> None:
    """Settings that need a Ray run are refused without one, before anything runs."""
    from tasks.runtime.placement import ray_address

    ppo = getattr(config, "ppo", None)
    if ppo is None or not ppo.reward_devices:
        return
    if ray_address(flag) is None:
        raise ValueError(f"ppo.reward_devices={ppo.reward_devices} puts the reward ensemble in a Ray actor: run "
                         "with --ray ADDRESS (or RAY_ADDRESS), or set it to 0")
    cpu_only = [key for key, value in getattr(config, "resources", {}).items()
                if key.split(":", 1)[0] in ("ppo", "ppo_run") and value.devices == 0]
    if cpu_only:
        raise ValueError(f"resources: {', '.join(cpu_only)} runs PPO without devices, so its reward actor "
                         f"(ppo.reward_devices={ppo.reward_devices}) would wait for devices the step does not hold")


def on_ray(flow, flag: str | None):
    """The flow as it is (one process), or on Prefect's RayTaskRunner when --ray or RAY_ADDRESS names a Ray."""
    from tasks.runtime.placement import ray_address, task_runner

    address = ray_address(flag)
    return flow if address is None else flow.with_options(task_runner=task_runner(address))


def print_placement(nodes: dict, device_gib: float | None, resources: dict) -> int:
    """--dry-run: every step of the plan by wave, with the devices and host memory it asks for and the accelerator
    memory it needs (rmens.memory); nothing runs."""
    from rmens.memory import estimates
    from rmens.steps.graph import placement
    from tasks.runtime.placement import node_request

    try:
        needs = estimates(nodes, devices_of(resources))
    except OSError as exc:  # a hub model whose config is neither cached nor reachable
        needs = {}
        print(f"(no memory estimates: {str(exc).splitlines()[0]})")
    over = device_gib is not None and any(e.gib > device_gib and nodes[n].found is None for n, e in needs.items())
    notes = {name: f"needs {e.size()}" + (f" per device, {e.devices} FSDP2 ranks" if e.devices > 1 else "")
             + (" > device" if device_gib is not None and e.gib > device_gib else "")
             for name, e in needs.items()}
    print("\n".join(placement(nodes, notes, lambda node: node_request(node, resources))))
    todo = sum(1 for node in nodes.values() if node.found is None)
    print(f"{len(nodes)} steps, {todo} to compute (dry run: nothing ran)" + (
        f"; some need more than one {device_gib:g} GiB device" if over else ""))
    return 0


def devices_of(resources: dict):
    """node -> the devices its call runs on, by the run's `resources` (a training step shards over them)."""
    from rmens.steps.resources_config import call_devices

    return lambda node: call_devices(node.name, node.step, resources)


def device_budget(flag: float | None) -> float | None:
    """The memory of one accelerator a plan must fit: --device-memory-gib, else the first CUDA device's; None on
    a machine without one (then nothing is checked)."""
    if flag is not None:
        return flag
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None


def _print_run_summary(name: str, preset: str, paths, report, run: str, steps: str,
                       seconds: float | None = None, experiment_id: str | None = None) -> None:
    print(f"\nrmens pipeline '{name}' " + (f"finished in {seconds:.1f} s" if seconds is not None else "is up to date"))
    print(f"  report:          {report}")
    print(f"  artifacts:       {paths.artifacts}")
    print(f"  MLflow store:    {paths.tracking_uri}  ({run})")
    address = None
    if experiment_id:  # a computed run: MLflow is loaded already (an up-to-date one loads neither it nor Prefect)
        from tasks.runtime.tracking import SHARED_VIEW  # the view the flow's publish step left

        address = runs_table_url(experiment_id, view=SHARED_VIEW)
    print(f"  compare the arms in the MLflow UI:  rmens ui --preset {preset}" + (
        f", then {address}" if address else "  (it prints the runs table's address)"))
    print(f"  steps: {steps}")


def ray_args(parser) -> None:
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="run independent steps at once on Ray, each asking for the devices and memory it "
                             "declares: local, local:gpus=N (N declared devices; steps still run on CPU where there "
                             "are none), or a cluster (ray://HOST:10001, auto); default $RAY_ADDRESS, else one "
                             "process")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every step by wave, with the devices and memory it asks for and whether the "
                             "store holds it; run nothing")
    parser.add_argument("--device-memory-gib", type=float, metavar="GIB",
                        help="memory of one accelerator: a plan with a step that cannot fit one is refused before "
                             "anything runs (default: the first CUDA device's; none checked without one)")


def cmd_experiment(args) -> int:
    from rmens.experiment.config import load_experiment

    config = load_experiment(args.size, args.set, eval_data=args.eval_data, data_dir=args.data_dir,
                             mt_bench_grades=args.mt_bench_grades)
    from rmens.experiment.data import check_inputs

    check_inputs(config.data, config.pools.judges, config.mt_bench)  # before a server starts or a folder is made
    check_ray_settings(config, args.ray)
    out = args.out or f"runs/experiment-{args.size}"
    budget = device_budget(args.device_memory_gib)
    if args.dry_run or budget is not None or config.resources:  # (the plan keyed once, for what asks for it)
        from rmens.experiment.data import source_fingerprints
        from rmens.experiment.plan import run_plan
        from rmens.memory import check_fit
        from rmens.steps import Store
        from rmens.steps.graph import record

        nodes, _ = record(run_plan, Store.of_project(out), config, part=args.part,
                          sources=source_fingerprints(config.data, config.mt_bench))
        check_resources(config.resources, nodes)
        if args.dry_run:
            return print_placement(nodes, args.device_memory_gib, config.resources)
        if budget is not None:
            check_fit(nodes, budget, devices_of(config.resources))
    check_servers()
    prepare_environment(out)
    from rmens.models.context import check_max_lengths

    check_max_lengths(config.trained_ensembles())
    start = time.perf_counter()
    with prefect_api():
        from flows.experiment import experiment

        result = on_ray(experiment, args.ray)(config=config, out=out, part=args.part, refresh=args.refresh)
    cached = sum(1 for s in result["states"].values() if s == "Cached")
    print(f"\nrmens experiment '{args.size}' ({args.part}) finished in {time.perf_counter() - start:.1f} s")
    print(f"  report:        {result['report']}")
    print(f"  Best-of-n:     {result['logged_bon']} (and logged_bon_<judge>.png)")
    print(f"  MLflow:        rmens ui --project-dir {result['out']}  (parent run {result['parent_run_id']})")
    print(f"  steps: {len(result['states'])} ({cached} served from Prefect's cache)")
    return 0


def registered_model_folder(uri: str) -> str:
    """`models:/<name>@<alias>` of the MLflow store MLFLOW_TRACKING_URI names, as a local ensemble folder (its
    weights only: no stored code runs)."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ValueError(f"{uri}: set MLFLOW_TRACKING_URI to the store that holds it (e.g. "
                         "sqlite:///runs/smoke/mlflow.db), or give a saved ensemble folder")
    import atexit
    import shutil
    import tempfile

    from tasks.registry import download_ensemble

    root = tempfile.mkdtemp(prefix="rmens-serve-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # a copy of the weights: gone when the server stops
    return str(download_ensemble(uri, root))


def cmd_ui(args) -> int:
    project = args.project_dir or preset_data(args.preset)["project_dir"]
    from tasks.runtime.paths import ProjectPaths

    paths = ProjectPaths.at(project)
    if not paths.mlflow_db.is_file() and "MLFLOW_TRACKING_URI" not in os.environ:
        raise FileNotFoundError(f"no MLflow store at {paths.mlflow_db}; run `rmens run` first")
    from mlflow.tracking import MlflowClient

    from tasks.runtime.tracking import SHARED_VIEW, VIEW_TAG, experiment_name

    found = MlflowClient(paths.tracking_uri).get_experiment_by_name(experiment_name(paths))
    view = SHARED_VIEW if found is not None and VIEW_TAG in found.tags else None
    return mlflow_ui(paths.tracking_uri, args.port, args.workers, found.experiment_id if found else None, view)


def cmd_flow(args) -> int:
    from rmens.pipeline.config import EvaluateFlowConfig, RetrainConfig, TrainFlowConfig

    model = {"train": TrainFlowConfig, "evaluate": EvaluateFlowConfig, "retrain": RetrainConfig}[args.name]
    config = job_config(model, args)
    from rmens.preflight import check_before_work

    check_before_work(config)  # here as well as in the flow: before a temporary server starts
    check_servers()
    prepare_environment(config.project_dir)
    with prefect_api():
        import flows.evaluate
        import flows.retrain
        import flows.train

        fn = {"train": flows.train.train, "evaluate": flows.evaluate.evaluate,
              "retrain": flows.retrain.retrain}[args.name]
        result = fn(config, refresh=args.refresh)
    print(json.dumps(result, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    presets = "\n".join(f"  {name:<6} {text}" for name, text in PRESETS.items())
    run = sub.add_parser("run", help="run the whole pipeline from a preset (default: smoke)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Train the reward ensembles of every arm, draw Best-of-n samples, run PPO and "
                                     "evaluate, as cached Prefect tasks tracked in MLflow. Re-running with nothing "
                                     "changed reports the last run in about a second; after a change only the stages "
                                     f"it affects are recomputed.\n\npresets:\n{presets}")
    run.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    config_args(run, "pipeline settings layered over the preset")
    run.add_argument("--refresh", action="store_true", help="recompute every stage, ignoring caches")
    run.add_argument("--record", action="store_true",
                     help="when every stage is up to date, still run the flow (a Prefect flow run and an MLflow "
                          "run of cache hits); without it such a re-run only reports the last run")
    ray_args(run)
    run.set_defaults(func=cmd_run)

    from rmens.experiment.config import SIZES

    sizes = "\n".join(f"  {name:<10} {text}" for name, text in SIZES.items())
    exp = sub.add_parser("experiment", help="the reference experiment: do ensembles help, judged by AlpacaEval's "
                                            "own verdicts? (Prefect flow + MLflow)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Train the gold judge and every arm, score logged AlpacaEval outputs once per "
                                     "model, compute Best-of-n win rates from the real judge's verdicts, run PPO "
                                     "judged by the gold model, and write a report that says where the results "
                                     "agree with Zhang et al. and Coste et al. `python bench/reference_experiment.py` "
                                     f"runs the same steps without Prefect or MLflow.\n\nsizes:\n{sizes}")
    exp.add_argument("--size", default="tiny", choices=list(SIZES))
    exp.add_argument("--eval-data", help="folder of AE-format files (ae1_gpt4_pairs*.jsonl.gz, "
                                         "ae2_gpt4turbo_pairs*.jsonl.gz) whose instructions are the evaluation pools; "
                                         "default: a held-out quarter of the training folder's instructions")
    exp.add_argument("--data-dir", help="folder of training verdicts (default $RMENS_DATA_DIR/alpaca_eval)")
    exp.add_argument("--mt-bench-grades", help="MT-Bench GPT-4 single-answer grades file (JSONL[.gz], FastChat's "
                                               "release format; default $RMENS_DATA_DIR/mt_bench/"
                                               "gpt4_single_grades.jsonl.gz)")
    exp.add_argument("--out", help="output and project folder (default runs/experiment-<size>)")
    exp.add_argument("--part", choices=["rewards", "all"], default="all", help="rewards: stop before PPO")
    exp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. --set ppo.steps=4")
    exp.add_argument("--refresh", action="store_true", help="recompute every step, ignoring caches")
    ray_args(exp)
    exp.set_defaults(func=cmd_experiment)

    ui = sub.add_parser("ui", help="open the MLflow UI on a project's store (compare arms there)")
    ui.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    ui.add_argument("--project-dir", help="project folder (default: the preset's)")
    ui.add_argument("--port", type=int, default=5000)
    # One person's browser needs one worker; MLflow's default of 4 costs 4 imports of MLflow at start-up.
    ui.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    ui.set_defaults(func=cmd_ui)

    server = sub.add_parser("server", help="keep a local Prefect API running, so runs skip its start-up")
    server.add_argument("action", choices=["start", "stop", "status"])
    server.add_argument("--project-dir", default="runs/smoke")
    server.add_argument("--port", type=int, default=SERVER_PORT, help=f"start: its port (default {SERVER_PORT})")
    server.set_defaults(func=cmd_server)

    flow_cmd = sub.add_parser("flow", help="run the train, evaluate or retrain flow")
    flow_cmd.add_argument("name", choices=["train", "evaluate", "retrain"])
    config_args(flow_cmd, "the flow's settings")
    flow_cmd.add_argument("--refresh", action="store_true")
    flow_cmd.set_defaults(func=cmd_flow)

    add_library_commands(sub)["serve"].set_defaults(resolve_model=registered_model_folder)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as it does for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    # SIGTERM ends a run as Ctrl-C does: finally blocks and exit handlers run, so temporary servers stop,
    # MLflow runs are marked KILLED and locks are released. Prefect arms its own SIGTERM bridge while a
    # flow runs (TerminationSignal), with the same effect.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run_command(build_parser().parse_args(argv))
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except BaseException as exc:
        if type(exc).__name__ != "TerminationSignal":  # prefect.exceptions; not imported before a flow runs
            raise
        return _interrupted(exc)


def _interrupted(exc: BaseException) -> int:
    # Stopping was asked once; Prefect's engine may send the signal on again as it unwinds, and with the
    # default handler back that would kill the process during its exit handlers (exit -2 instead of 130).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    print("rmens: stopped; finished stages are kept and the next run continues from them", file=sys.stderr)
    return 130 if type(exc) is KeyboardInterrupt else 143


if __name__ == "__main__":
    sys.exit(main())
