"""The steps of the reference experiment, each `step(folder, **inputs) -> summary`, by name.

A step writes everything it produces into its own `folder` and reads its inputs from the folders of
earlier steps, so the same functions run under the plain runner (rmens.experiment.runner) and as
Prefect tasks with MLflow tracking (tasks/experiment.py). Summaries are flat and JSON-serialisable.
"""

from __future__ import annotations

from rmens.experiment.data import pairs_step, pools_step
from rmens.experiment.ppo import ppo_step
from rmens.experiment.ppo_eval import ppo_eval_step
from rmens.experiment.report import report_step
from rmens.experiment.rewards import rewards_step
from rmens.experiment.scoring import score_step
from rmens.experiment.train import proxy_labels_step, train_step
from rmens.experiment.twins import twins_step

STEPS = {"pairs": pairs_step, "pools": pools_step, "train": train_step, "proxy_labels": proxy_labels_step,
         "score": score_step, "twins": twins_step, "rewards": rewards_step, "ppo": ppo_step, "ppo_eval": ppo_eval_step,
         "report": report_step}
