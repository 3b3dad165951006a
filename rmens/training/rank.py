"""One rank of a sharded training step, started by rmens.training.launcher:

    python -m torch.distributed.run --standalone --nproc_per_node N -m rmens.training.rank JOB

JOB is the ShardedJob JSON the launcher wrote. The rank joins the process group (nccl on CUDA devices, gloo
on CPUs), refuses a world that is not the launcher config's size (rmens.training.sharding.check_launch),
and trains with the model sharded over the ranks; rank 0 saves it. A failure is written as one line to the
job's error file, for the launcher to report.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path


def main(job_file: str) -> None:
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from rmens.data.loaders import load_jsonl_pairs
    from rmens.io import write_json
    from rmens.training.launcher import ShardedJob
    from rmens.training.members import save_member, train_member
    from rmens.training.sharding import LaunchError, check_launch
    from rmens.training.trainer import train_ensemble, training_precision

    # The ensemble's forward returns a transposed view, which FSDP2 warns about in case it is changed in place;
    # the loss only slices it.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    job = ShardedJob.model_validate_json(Path(job_file).read_text())
    stop_with_parent()
    cuda = torch.cuda.is_available()
    if (job.device == "cuda") != cuda:  # e.g. a rank whose CUDA is not visible would train on CPUs, slowly
        raise LaunchError(f"the job was launched to train on {job.device}, but this rank "
                          f"{'sees CUDA' if cuda else 'sees no CUDA device'}")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = job.launch.backend if job.launch.backend != "auto" else ("nccl" if cuda else "gloo")
        dist.init_process_group(backend, timeout=timedelta(minutes=job.launch.timeout_minutes))
    check_launch(job.launch)  # before any work: a lone process would train an unsharded copy
    # Mixed precision as in one process (autocast over fp32 weights); split_batches: the ranks share each
    # validation batch (training batches are split by rmens.training.sharding.rank_batches); cpu: without it
    # accelerate sees no distributed run on CPUs (DistributedType.NO, every rank the main one).
    accelerator = Accelerator(cpu=not cuda, gradient_accumulation_steps=job.train.grad_accum,
                              mixed_precision=training_precision(job.train),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if accelerator.num_processes != job.launch.nproc:
        raise LaunchError(f"accelerate sees {accelerator.num_processes} process(es) ({accelerator.distributed_type}), "
                          f"the launcher config {job.launch.nproc}: refusing to train unsharded copies")
    train = load_jsonl_pairs(job.train_pairs)
    val = load_jsonl_pairs(job.val_pairs) if job.val_pairs else None
    if job.member is None:
        train_ensemble(job.ensemble, job.train, train, val, job.output_dir, accelerator=accelerator,
                       overwrite=job.overwrite, launch=job.launch)
    else:  # one member of a full ensemble; rank 0 saves it gathered
        trained = train_member(job.ensemble, job.train, job.member, train, val, accelerator=accelerator,
                               launch=job.launch)
        if accelerator.is_main_process:
            save_member(trained, job.output_dir)
    write_json(job.rank_file(dist.get_rank()), peak_memory(cuda))
    accelerator.wait_for_everyone()  # every rank's files are written: nothing is left to do but exit


def stop_with_parent() -> None:
    """Have Linux stop this rank when torchrun, its parent, dies (killed outright, it cannot stop its ranks,
    which run in sessions of their own and would keep their devices)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: torchrun's own shutdown still stops the ranks


def peak_memory(cuda: bool) -> dict:
    """This rank's peak: PyTorch's allocated device memory on a GPU, the process's resident memory on a CPU."""
    import resource

    import torch

    if cuda:
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "memory": "cuda"}
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "memory": "rss"}  # KiB on Linux


def report(job_file: str, error: BaseException) -> None:
    """Append this rank's error as one line to the job's error file (the launcher shows the first)."""
    import json

    try:
        error_file = Path(json.loads(Path(job_file).read_text())["work_dir"]) / "error.txt"
        line = f"rank {os.environ.get('RANK', '0')}: {type(error).__name__}: {error}".replace("\n", " ")
        with open(error_file, "a") as out:
            out.write(line + "\n")
    except (OSError, ValueError, KeyError):
        pass  # the traceback below still reaches the step's output


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except BaseException as err:
        report(sys.argv[1], err)
        traceback.print_exc()
        sys.exit(1)
    # Exit without the interpreter's teardown: there a gloo rank on CPUs sometimes aborted ("terminate called
    # without an active exception", from a native thread, after every rank's files were written: seen in a few
    # of some thirty runs on a loaded 2-core machine), which torchrun reports as a failed step.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
