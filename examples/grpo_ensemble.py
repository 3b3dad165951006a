"""GRPO (TRL) against an rmens ensemble's reward under a conservative rule, logged to MLflow as rmens logs its
own runs. A single-purpose script: read it top to bottom.

    rmens train --config job.yaml --output runs/ensemble                 # or any saved ensemble folder
    python examples/grpo_ensemble.py --ensemble runs/ensemble --rule lcb1 --policy smollm2-135m --steps 50
    rmens ui --project-dir runs/grpo                                     # rewards/rmens_lcb1/mean, kl, rmens/*

Prompts are AlpacaEval's train-split instructions when RMENS_DATA_DIR is set (never the test split), else
rmens' synthetic ones. Needs `pip install -e ".[trl]"`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from rmens.data.prompts import alpaca_eval_instructions, synthetic_prompts
from rmens.integrations.trl import ensemble_reward_func
from rmens.models.backbone import resolve_model


def prompts(n: int, seed: int) -> list[str]:
    if os.environ.get("RMENS_DATA_DIR"):
        return [row["instruction"] for row in alpaca_eval_instructions("train")[:n]]
    return synthetic_prompts(n, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ensemble", required=True, help="a saved rmens ensemble folder")
    parser.add_argument("--rule", default="lcb1", help="mean, min, lcb<beta> or uwo<lam>")
    parser.add_argument("--policy", default="smollm2-135m", help="alias, folder or Hugging Face id")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--project-dir", default="runs/grpo", help="where the MLflow store and checkpoints go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    project = Path(args.project_dir).resolve()
    project.mkdir(parents=True, exist_ok=True)
    # The same layout as an rmens project: its own SQLite store, one experiment per project folder.
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", f"rmens-{project.name}")
    os.environ.setdefault("MLFLOW_TAGS", f'{{"rmens.flow": "grpo", "rmens.rule": "{args.rule}", '
                                         f'"rmens.ensemble": "{args.ensemble}"}}')

    gpu = torch.cuda.is_available()
    config = GRPOConfig(output_dir=str(project / "checkpoints"), max_steps=args.steps, per_device_train_batch_size=4,
                        num_generations=4, max_completion_length=64, learning_rate=1e-6, logging_steps=1,
                        report_to=["mlflow"], run_name=f"grpo:{args.rule}", seed=args.seed, save_strategy="no",
                        bf16=gpu and torch.cuda.is_bf16_supported(), use_cpu=not gpu)
    trainer = GRPOTrainer(model=resolve_model(args.policy), args=config,
                          reward_funcs=[ensemble_reward_func(args.ensemble, rule=args.rule)],
                          train_dataset=Dataset.from_dict({"prompt": prompts(args.prompts, args.seed)}))
    trainer.train()
    trainer.save_model(str(project / "policy"))
    print(f"policy in {project / 'policy'}; curves in MLflow: rmens ui --project-dir {project}")


if __name__ == "__main__":
    main()
