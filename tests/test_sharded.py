"""Sharded training steps: a step granted two devices trains as two FSDP2 ranks under torchrun (gloo on this
CPU machine), computing what one process does; the launch guard refuses a lone or unsharded process."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmens.data.loaders import synthetic_pairs
from rmens.errors import ShardedStepError
from rmens.io import write_jsonl
from rmens.models.config import EnsembleConfig
from rmens.reward import EnsembleReward
from rmens.steps.contract import devices_granted, granted_devices
from rmens.training.config import TrainConfig, check_divisible
from rmens.training.launcher import ShardedJob, train_on_devices
from rmens.training.sharding import LaunchConfig, LaunchError, check_sharded

CFG = TrainConfig(max_steps=3, batch_size=4, eval_batch_size=4, lr=1e-3, progress=False, calibration_pairs=8)
PROMPTS, RESPONSES = ["Name a colour.", "Add 2 and 2."], ["Blue, like the sky.", "It is 4."]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    pairs = synthetic_pairs(17, seed=3)  # 9 to train on: batches of 4, 4 and 1 (rank 1's share of the last pads)
    write_jsonl(folder / "train.jsonl", (p.to_dict() for p in pairs[:9]))
    write_jsonl(folder / "val.jsonl", (p.to_dict() for p in pairs[9:]))
    return folder / "train.jsonl", folder / "val.jsonl"


def losses(result) -> list[float]:
    return [point["train/loss"] for stage in result.stages.values() for point in stage.history]


@pytest.mark.parametrize("kind", ["linear", "lora", "full"])
def test_two_ranks_train_what_one_process_does(tmp_path, pair_files, kind):
    """The loss curve, the validation metrics and the saved ensemble's rewards of two FSDP2 ranks (each holding
    half of every trained weight) equal one process's within float32 reduction order. (A full ensemble: one
    sharded job per member, assembled in the calling process.)"""
    ens = EnsembleConfig(kind=kind, k=2, max_length=64)
    curves = []
    one = train_on_devices(1, ens, CFG, *pair_files, tmp_path / "one" / "ensemble", log_fn=None)
    two = train_on_devices(2, ens, CFG, *pair_files, tmp_path / "two" / "ensemble",
                           log_fn=lambda step, metrics: curves.append((step, metrics)))
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert len(losses(one)) == 3 * (1 if kind == "linear" else 2)  # LoRA: two stages; full: two members
    assert two.metrics["accuracy"] == pytest.approx(one.metrics["accuracy"], abs=1e-6)
    steps = [point["step"] for stage in two.stages.values() for point in stage.history]
    assert [step for step, metrics in curves if "train/loss" in metrics] == steps
    assert "val_accuracy" in curves[-1][1]  # the final metrics, replayed as the one-process trainer logs them
    assert len(two.ranks) == 2 and all(r["peak_mib"] > 0 for r in two.ranks)
    for stage in one.stages:  # each rank held about half the trained weights and Adam state (FSDP2 pads shards)
        assert 0.45 < two.stages[stage].state_mib / one.stages[stage].state_mib < 0.6
    rewards = [EnsembleReward.from_folder(tmp_path / run / "ensemble")(PROMPTS, RESPONSES) for run in ("one", "two")]
    torch.testing.assert_close(rewards[1].members, rewards[0].members, rtol=1e-4, atol=1e-5)
    if kind == "full":  # one sharded job per member, whose folders go once the ensemble is assembled
        assert not (tmp_path / "two" / "ensemble.members").exists()
        return
    job = ShardedJob.model_validate_json((tmp_path / "two" / "ensemble.launch" / "job.json").read_text())
    assert (job.launch.nproc, job.launch.sharding, job.launch.launcher, job.device) == (2, "fsdp2", "torchrun", "cpu")


def test_a_training_step_granted_two_devices_shards(tmp_path):
    """The pipeline's train_ensemble step, run by the plain runner whose resources give it two devices: its
    folder holds the ensemble the ranks trained, which loads and scores."""
    from rmens.data.config import DataConfig
    from rmens.pipeline.data import prepare_data
    from rmens.pipeline.reward_models import train_ensemble
    from rmens.steps.resources_config import StepResources
    from rmens.steps.runner import LocalRunner
    from rmens.steps.store import Store

    call = LocalRunner(Store(tmp_path / "store"), resources={"train_ensemble:linear": StepResources(devices=2)})
    data = call(prepare_data, "arms", data=DataConfig(source="synthetic", max_pairs=24, val_fraction=0.25))
    assert granted_devices() == 1
    with devices_granted(1):  # the runner's placement wins over what is around it
        out = call(train_ensemble, "linear", data=data, ensemble=EnsembleConfig(kind="linear", k=2, max_length=64),
                   train_cfg=CFG, label="linear")
    assert json.loads((Path(out.path) / "ensemble.launch" / "rank1.json").read_text())["memory"] == "rss"
    scores = EnsembleReward.from_folder(out.file("ensemble"))(PROMPTS, RESPONSES).scores
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert out.summary["steps"] == 3 and 0 <= out.summary["val_accuracy"] <= 1


def test_launch_guard_refuses_a_lone_process(tmp_path, pair_files):
    """A rank started without torchrun (world of 1) when its launcher config says 2 trains nothing: it exits with
    the reason in the job's error file, and no ensemble is saved."""
    job = ShardedJob(launch=LaunchConfig(nproc=2), ensemble=EnsembleConfig(kind="linear", k=2, max_length=64),
                     train=CFG, train_pairs=str(pair_files[0]), output_dir=str(tmp_path / "ensemble"),
                     work_dir=str(tmp_path))
    (tmp_path / "job.json").write_text(job.model_dump_json())
    done = subprocess.run([sys.executable, "-m", "rmens.training.rank", str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "world of 1 process(es), but its launcher config asks for 2" in job.error_file.read_text()
    assert not (tmp_path / "ensemble").exists()


def test_a_rank_refuses_another_device_than_its_launcher_saw(tmp_path, pair_files):
    """A job launched to train on CUDA whose rank sees none (CUDA hidden from it) refuses rather than training
    on CPUs."""
    job = ShardedJob(launch=LaunchConfig(nproc=2), ensemble=EnsembleConfig(kind="linear", k=2, max_length=64),
                     train=CFG, train_pairs=str(pair_files[0]), output_dir=str(tmp_path / "ensemble"),
                     work_dir=str(tmp_path), device="cuda")
    (tmp_path / "job.json").write_text(job.model_dump_json())
    done = subprocess.run([sys.executable, "-m", "rmens.training.rank", str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "launched to train on cuda, but this rank sees no CUDA device" in job.error_file.read_text()


def test_a_plans_sharded_batches_must_split_before_anything_runs(tmp_path):
    """resources giving a training step 3 devices whose batches of 8 pairs cannot split over them is refused
    when the plan is checked, naming the call."""
    from flows.cli import check_resources
    from rmens.config import apply_overrides
    from rmens.pipeline.config import PipelineConfig
    from rmens.pipeline.plan import run_pipeline
    from rmens.presets import preset_data
    from rmens.steps.graph import record
    from rmens.steps.resources_config import StepResources
    from rmens.steps.store import Store

    config = PipelineConfig.model_validate(apply_overrides(preset_data("smoke"), [f"project_dir={tmp_path}",
                                                                                  "train.batch_size=8"]))
    nodes = record(run_pipeline, Store.of_project(tmp_path), config)[0]
    check_resources({"train_ensemble": StepResources(devices=2)}, nodes)
    with pytest.raises(ValueError, match=r"resources: train_ensemble:\S+: train.batch_size 8 does not split over 3"):
        check_resources({"train_ensemble": StepResources(devices=3)}, nodes)


def test_launch_guard_refuses_unsharded_parameters():
    """What accelerate's FSDP config does on CPUs (a silent fallback): parameters left whole are refused."""
    with pytest.raises(LaunchError, match="parameter weight is not sharded over the 2 ranks"):
        check_sharded(torch.nn.Linear(4, 2), 2)


def test_a_failing_rank_is_one_line(tmp_path, pair_files):
    with pytest.raises(ShardedStepError, match=r"failed \(exit 1\): rank \d: FileNotFoundError: .*missing.jsonl"):
        train_on_devices(2, EnsembleConfig(kind="linear", k=2, max_length=64), CFG, tmp_path / "missing.jsonl", None,
                         tmp_path / "out" / "ensemble")
    assert not (tmp_path / "out" / "ensemble").exists()


def test_batches_must_split_over_the_devices():
    with pytest.raises(ValueError, match="train.batch_size 4 does not split over 3 devices"):
        check_divisible(3, CFG)


def test_only_steps_that_shard_take_several_devices():
    import rmens.pipeline.plan  # noqa: F401  (declares the pipeline's steps)
    from flows.cli import check_resources
    from rmens.steps.resources_config import StepResources

    check_resources({"train_ensemble": StepResources(devices=2)}, {})
    with pytest.raises(ValueError, match="resources: ppo asks for more than one device"):
        check_resources({"ppo": StepResources(devices=2)}, {})


TRAIN_SETTINGS = ["--set", "data.source=synthetic", "--set", "data.max_pairs=24", "--set", "data.val_fraction=0.25",
                  "--set", "ensemble.k=2", "--set", "ensemble.max_length=64", "--set", "train.max_steps=2",
                  "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4", "--set", "train.progress=false",
                  "--set", "train.calibration_pairs=8"]


def test_rmens_train_shards_a_full_ensemble_member_by_member(tmp_path):
    """`rmens train --devices 2` of a full ensemble: one two-rank job per member, assembled here; the ensemble
    loads and its summary is printed. Two nodes for a full ensemble are refused before anything is written."""
    common = [sys.executable, "-m", "rmens.cli", "train", *TRAIN_SETTINGS, "--set", "ensemble.kind=full"]
    done = subprocess.run([*common, "--devices", "2", "--output", str(tmp_path / "ens")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout[done.stdout.index("{"):])
    assert printed["output"] == str(tmp_path / "ens") and 0 <= printed["accuracy"] <= 1
    assert EnsembleReward.from_folder(tmp_path / "ens").ensemble.k == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens", "ens.launch"]  # members' folders gone
    refused = subprocess.run([*common, "--nodes", "2", "--rdzv", "127.0.0.1:29400", "--output", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "a full ensemble trains one member at a time" in refused.stderr
    assert not (tmp_path / "x.launch").exists()


def test_a_two_node_job_meets_at_its_rendezvous(tmp_path):
    """`rmens train --devices 1 --nodes 2 --rdzv HOST:PORT` prints the command each node starts; started twice
    here (two "nodes" of one rank on one machine), the ranks meet at the rendezvous and train one sharded model."""
    from conftest import free_port

    done = subprocess.run([sys.executable, "-m", "rmens.cli", "train", *TRAIN_SETTINGS, "--devices", "1",
                           "--nodes", "2", "--rdzv", f"127.0.0.1:{free_port()}", "--output", str(tmp_path / "ens")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    intro, command = done.stdout.strip().splitlines()[-2:]
    assert "(2 ranks); start this on each of the 2 nodes" in intro and "--nnodes=2" in command
    assert not (tmp_path / "ens").exists()  # nothing trained yet
    nodes = [subprocess.Popen(shlex.split(command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-2000:]
    scores = EnsembleReward.from_folder(tmp_path / "ens")(PROMPTS, RESPONSES).scores
    assert torch.isfinite(scores).all()


def _ranks_of(job_file) -> list[int]:
    """pids of the rank processes running `job_file`."""
    found = subprocess.run(["pgrep", "-f", f"rmens.training.rank {job_file}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def _start_long_training(tmp_path) -> tuple[subprocess.Popen, Path]:
    """`rmens train --devices 2` with far more steps than the test waits for, once both ranks are up."""
    import time

    output = tmp_path / "ens"
    settings = [s.replace("train.max_steps=2", "train.max_steps=100000") for s in TRAIN_SETTINGS]
    proc = subprocess.Popen([sys.executable, "-m", "rmens.cli", "train", *settings, "--devices", "2", "--output",
                             str(output)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_file = tmp_path / "ens.launch" / "job.json"
    deadline = time.monotonic() + 120
    while len(_ranks_of(job_file)) < 2 or not list(tmp_path.glob("ens.launch/*.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no ranks"
        time.sleep(0.5)
    time.sleep(5)  # inside training: both ranks in the collectives of its steps
    return proc, job_file


def test_a_rank_killed_mid_training_fails_the_step_and_stops_the_other(tmp_path):
    """A rank that dies in the middle of training (killed, as the kernel's OOM killer would) fails the step in
    one line, and its partner, waiting in a collective, is stopped rather than left holding its device."""
    import os
    import signal

    proc, job_file = _start_long_training(tmp_path)
    os.kill(_ranks_of(job_file)[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "sharded training on 2 devices failed" in err.strip().splitlines()[-1]
    assert _ranks_of(job_file) == [] and not (tmp_path / "ens").exists()


def test_a_stopped_step_stops_its_ranks(tmp_path):
    """Ctrl-C to the process that launched the ranks (a cancelled step): torchrun is told to stop them, and none is
    left running."""
    import os
    import signal

    proc, job_file = _start_long_training(tmp_path)
    os.kill(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert _ranks_of(job_file) == [] and not (tmp_path / "ens").exists()
