"""Training a reward model on the devices a step was granted: in this process on one, or sharded over several.

With more than one device, the step's process launches torchrun (the launcher config, rmens/presets/launch/
fsdp2.yaml), one rank per device, each running rmens.training.rank; they inherit this process's
CUDA_VISIBLE_DEVICES (what Ray granted the step), so they use exactly those devices, and on a machine without
any (tests, `--ray local:gpus=N`) they run on CPUs with gloo. The ranks split every batch of
`train.batch_size` pairs between them, so what is computed does not depend on the number of devices, and
that number stays out of the step's key, as every placement setting does.

The job the ranks run is a JSON file beside the output folder (`<output>.launch/job.json`); their error, if any,
comes back as one line, and the model they trained as the saved folder rank 0 wrote. A step larger than one node
runs the same job on several: `rmens train --devices N --nodes M --rdzv HOST:PORT` writes it and prints the
torchrun command to start on each node (README, "Sharded training steps").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from rmens.config import StrictModel, derive
from rmens.data.loaders import load_jsonl_pairs
from rmens.errors import ShardedStepError
from rmens.evaluation.rm_metrics import scalar_metrics
from rmens.models.config import EnsembleConfig
from rmens.training.config import TrainConfig, check_divisible
from rmens.training.sharding import LaunchConfig
from rmens.training.trainer import LogFn, StageResult, TrainResult

if TYPE_CHECKING:
    from rmens.training.members import TrainedMember

RANK_MODULE = "rmens.training.rank"


class ShardedJob(StrictModel):
    """What every rank of a sharded step trains (written by `train_sharded`, read by rmens.training.rank)."""

    launch: LaunchConfig = Field(description="How it is launched and sharded (the launch guard checks it).")
    ensemble: EnsembleConfig = Field(description="The ensemble it trains (or one member of).")
    train: TrainConfig = Field(description="How it is trained.")
    train_pairs: str = Field(description="JSONL file of the training pairs.")
    val_pairs: str | None = Field(None, description="JSONL file of the validation pairs.")
    output_dir: str = Field(description="Folder rank 0 saves the trained ensemble (or member) to.")
    member: int | None = Field(None, ge=0, description="Train this member of a full ensemble alone "
                                                      "(rmens.training.members), not the whole ensemble.")
    device: Literal["cuda", "cpu"] = Field("cpu", description="What the launching process trains on: a rank "
                                                              "that sees otherwise refuses to train.")
    overwrite: bool = Field(False, description="Replace a non-empty output folder that is not a saved ensemble.")
    work_dir: str = Field(description="Folder of the job: its file, a failing rank's one-line error (error.txt), "
                                      "each rank's peak memory (rank<N>.json).")

    @property
    def file(self) -> Path:
        return Path(self.work_dir) / "job.json"

    @property
    def error_file(self) -> Path:
        return Path(self.work_dir) / "error.txt"

    def rank_file(self, rank: int) -> Path:
        return Path(self.work_dir) / f"rank{rank}.json"


def train_on_devices(devices: int, ens_cfg: EnsembleConfig, cfg: TrainConfig, train_pairs: Path,
                     val_pairs: Path | None, output_dir: Path, log_fn: LogFn | None = None,
                     overwrite: bool = False) -> TrainResult:
    """Train and save an ensemble on `devices` devices (rmens.steps.contract.granted_devices): in this process
    on one, as `devices` FSDP2 ranks otherwise (a full ensemble: one sharded job per member, then assembled
    here, as its member steps and assembly step would)."""
    from rmens.training.members import assemble
    from rmens.training.trainer import train_ensemble

    if devices > 1 and ens_cfg.kind != "full":  # (the ranks read the pairs)
        return train_sharded(devices, ens_cfg, cfg, train_pairs, val_pairs, Path(output_dir), log_fn, overwrite)
    val = load_jsonl_pairs(val_pairs) if val_pairs is not None else None
    if devices <= 1:
        return train_ensemble(ens_cfg, cfg, load_jsonl_pairs(train_pairs), val, output_dir, log_fn=log_fn,
                              overwrite=overwrite)
    start = time.perf_counter()
    folders = Path(output_dir).with_name(Path(output_dir).name + ".members")  # rmens' own, until assembled
    shutil.rmtree(folders, ignore_errors=True)
    members = [train_member_on_devices(devices, ens_cfg, cfg, i, train_pairs, val_pairs, folders / f"m{i}", log_fn)
               for i in range(ens_cfg.k)]
    result = assemble(ens_cfg, cfg, members, val, output_dir, log_fn, overwrite=overwrite, start=start)
    shutil.rmtree(folders)  # the assembled ensemble holds every member
    result.ranks = [max((m.ranks[r] for m in members), key=lambda rank: rank["peak_mib"]) for r in range(devices)]
    return result


def train_member_on_devices(devices: int, ens_cfg: EnsembleConfig, cfg: TrainConfig, member: int, train_pairs: Path,
                            val_pairs: Path | None, folder: Path, log_fn: LogFn | None = None) -> TrainedMember:
    """Member `member` of a full ensemble trained alone and saved to `folder` (rmens.training.members): in this
    process on one device, as `devices` FSDP2 ranks otherwise."""
    from rmens.training.members import check_member, load_member, save_member, train_member

    check_member(ens_cfg, member)
    if devices <= 1:
        val = load_jsonl_pairs(val_pairs) if val_pairs is not None else None
        trained = train_member(ens_cfg, cfg, member, load_jsonl_pairs(train_pairs), val, log_fn=log_fn)
        save_member(trained, folder)
        return trained
    check_devices(devices)
    job = write_job(devices, ens_cfg, cfg, train_pairs, val_pairs, Path(folder), member=member)
    run_job(job)
    trained = load_member(folder)
    _replay(trained.stage.history, {}, log_fn)
    trained.ranks = _ranks(job)
    return trained


def check_devices(devices: int) -> None:
    """Refuse, before launching, more ranks than this machine shows CUDA devices (on a machine with none, the
    ranks are CPU processes)."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible and devices > visible:
        raise ValueError(f"{devices} devices asked for, but this process sees {visible} CUDA device(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


def write_job(world: int, ens_cfg: EnsembleConfig, cfg: TrainConfig, train_pairs: Path, val_pairs: Path | None,
              output_dir: Path, overwrite: bool = False, member: int | None = None) -> ShardedJob:
    """The job of `world` ranks, written to `<output_dir>.launch/job.json`, after the checks that need no rank."""
    import torch

    from rmens.models.ensemble import check_output_folder

    check_divisible(world, cfg)
    check_output_folder(output_dir, overwrite)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # what every rank must see too
    work = output_dir.with_name(output_dir.name + ".launch")
    work.mkdir(parents=True, exist_ok=True)
    job = ShardedJob(launch=derive(LaunchConfig.load(), nproc=world), ensemble=ens_cfg, train=cfg,
                     train_pairs=str(Path(train_pairs).resolve()), output_dir=str(output_dir.resolve()),
                     val_pairs=str(Path(val_pairs).resolve()) if val_pairs else None, overwrite=overwrite,
                     member=member, device=device, work_dir=str(work.resolve()))
    job.file.write_text(job.model_dump_json(indent=2))
    for stale in (job.error_file, *map(job.rank_file, range(world))):  # of an earlier, interrupted launch
        stale.unlink(missing_ok=True)
    return job


def torchrun_command(job: ShardedJob, per_node: int, nodes: int = 1, endpoint: str | None = None) -> list[str]:
    """The command that starts the job's ranks: on this node alone (--standalone: a free port, no rendezvous
    to set up), or the same command on each of `nodes` nodes, meeting at the c10d rendezvous `endpoint`."""
    where = ["--standalone"] if nodes == 1 else [f"--nnodes={nodes}", "--rdzv-backend=c10d",
                                                 f"--rdzv-endpoint={endpoint}", f"--rdzv-id={Path(job.work_dir).name}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={per_node}", "-m", RANK_MODULE,
            str(job.file)]


def train_sharded(devices: int, ens_cfg: EnsembleConfig, cfg: TrainConfig, train_pairs: Path,
                  val_pairs: Path | None, output_dir: Path, log_fn: LogFn | None = None,
                  overwrite: bool = False) -> TrainResult:
    """Launch `devices` ranks of rmens.training.rank on this node with torchrun, wait for them, and return what
    rank 0 saved in `output_dir` (the training curve replayed to `log_fn`)."""
    check_devices(devices)
    job = write_job(devices, ens_cfg, cfg, train_pairs, val_pairs, Path(output_dir), overwrite)
    start = time.perf_counter()
    run_job(job)
    return read_result(job, log_fn, time.perf_counter() - start)


def run_job(job: ShardedJob) -> None:
    """Start the job's ranks on this node and wait for them; a failure is one line naming a rank's error. If
    this process is stopped while they run (Ctrl-C, a cancelled task), torchrun is told to stop them first:
    killed outright, it would leave its ranks (in sessions of their own) holding the devices."""
    world = job.launch.nproc
    # faulthandler: a rank that dies in native code (an abort) still leaves its Python stack in the output
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    launcher = subprocess.Popen(torchrun_command(job, world), env=env)
    try:
        code = launcher.wait()
    except BaseException:
        launcher.terminate()  # torchrun passes SIGTERM on to its ranks and waits for them
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
        raise
    if code != 0:
        raise ShardedStepError(f"sharded training on {world} devices failed (exit {code}): "
                               f"{_first_error(job.error_file)}; job {job.file}")


def read_result(job: ShardedJob, log_fn: LogFn | None = None, wall_time: float | None = None) -> TrainResult:
    """What the job's ranks trained: the ensemble rank 0 saved, its metrics and curve (replayed to `log_fn`, as
    the one-process trainer reports them while it runs) and each rank's peak memory."""
    from rmens.models.ensemble import load_ensemble

    output_dir = Path(job.output_dir)
    ensemble, _ = load_ensemble(output_dir)
    if ensemble.kind == "lora":  # loaded for scoring, adapters frozen; trained, they were not (trainable counts)
        ensemble.set_adapters_trainable(True)
    summary = json.loads((output_dir / "train_metrics.json").read_text())
    stages = {name: StageResult(steps=summary["steps"][name], wall_time=summary["wall_time"][name],
                                history=summary["history"][name], state_mib=summary["state_mib"][name])
              for name in summary["steps"]}
    _replay([point for stage in stages.values() for point in stage.history], summary["metrics"], log_fn)
    total = wall_time if wall_time is not None else sum(s.wall_time for s in stages.values())
    return TrainResult(ensemble=ensemble, path=output_dir, metrics=summary["metrics"], stages=stages, wall_time=total,
                       ranks=_ranks(job))


def _replay(history: list[dict], metrics: dict, log_fn: LogFn | None) -> None:
    """The ranks' curve and final metrics to `log_fn`, as the one-process trainer reports them while it runs."""
    if log_fn is None:
        return
    for point in history:
        log_fn(point["step"], {k: v for k, v in point.items() if k != "step"})
    if metrics:
        log_fn(history[-1]["step"] if history else 0, scalar_metrics(metrics, "val_"))


def _ranks(job: ShardedJob) -> list[dict]:
    return [json.loads(job.rank_file(rank).read_text()) for rank in range(job.launch.nproc)]


def _first_error(error_file: Path) -> str:
    if error_file.is_file() and error_file.read_text().strip():
        return error_file.read_text().strip().splitlines()[0]
    return "no rank reported its error (see the ranks' output above)"
