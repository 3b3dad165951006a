"""The steps of the reference experiment, each `step(folder, **inputs) -> summary`, and the library code
each one depends on.

A step writes everything it produces into its own `folder` and reads its inputs from the folders of
earlier steps, so the same functions run under the plain runner (rmens.experiment.runner) and as
Prefect tasks with MLflow tracking (tasks/experiment.py). Summaries are flat and JSON-serialisable.
"""

from __future__ import annotations

from pathlib import Path

from rmens.experiment.config import SplitConfig
from rmens.experiment.data import prepare_data
from rmens.experiment.ppo import ppo_eval_step, ppo_step
from rmens.experiment.report import report_step
from rmens.experiment.scoring import rewards_step, score_step
from rmens.experiment.train import proxy_labels_step, train_step


def data_step(folder: Path, *, split: SplitConfig) -> dict:
    """Evaluation pools, training pairs and prompt sets (rmens.experiment.data)."""
    return prepare_data(split, folder)


STEPS = {"data": data_step, "train": train_step, "proxy_labels": proxy_labels_step, "score": score_step,
         "rewards": rewards_step, "ppo": ppo_step, "ppo_eval": ppo_eval_step, "report": report_step}
