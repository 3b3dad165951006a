"""The steps of the reference experiment, each `step(folder, **inputs) -> summary`, and the library code
each one depends on.

A step writes everything it produces into its own `folder` and reads its inputs from the folders of
earlier steps, so the same functions run under the plain runner (rmens.experiment.runner) and as
Prefect tasks with MLflow tracking (tasks/experiment.py). Summaries are flat and JSON-serialisable.
"""

from __future__ import annotations

from pathlib import Path

from rmens.experiment.config import DataSource, MtBenchConfig, PoolConfig, SplitConfig
from rmens.experiment.data import build_pools, split_pairs
from rmens.experiment.ppo import ppo_step
from rmens.experiment.ppo_eval import ppo_eval_step
from rmens.experiment.report import report_step
from rmens.experiment.rewards import rewards_step
from rmens.experiment.scoring import score_step
from rmens.experiment.train import proxy_labels_step, train_step
from rmens.experiment.twins import twins_step


def pairs_step(folder: Path, *, source: DataSource, split: SplitConfig, sources: dict) -> dict:
    """The training side: gold and proxy pairs, PPO prompts (rmens.experiment.data.split_pairs)."""
    return split_pairs(source, split, folder, sources)


def pools_step(folder: Path, *, source: DataSource, pools: PoolConfig, mt_bench: MtBenchConfig, sources: dict) -> dict:
    """The evaluation side: logged-output pools of held-out systems, MT-Bench's graded pools, the systems' priors
    and PPO's evaluation prompts (rmens.experiment.data.build_pools)."""
    return build_pools(source, pools, mt_bench, folder, sources)


STEPS = {"pairs": pairs_step, "pools": pools_step, "train": train_step, "proxy_labels": proxy_labels_step,
         "score": score_step, "twins": twins_step, "rewards": rewards_step, "ppo": ppo_step, "ppo_eval": ppo_eval_step,
         "report": report_step}
