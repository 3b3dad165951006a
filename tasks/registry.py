"""MLflow model registry: score registered ensembles on held-out pairs and move the champion alias."""

from __future__ import annotations

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rmens.data.schema import PreferencePair
from rmens.evaluation.rm_metrics import calibration, pairwise_accuracy


def score_registered(uri: str, pairs: list[PreferencePair]) -> dict[str, float]:
    """Accuracy and ECE of a registered ensemble (models:/name/version or models:/name@alias), scored from its
    weights with the aggregation it was logged with; the model's stored code is not run."""
    import tempfile

    import yaml

    from rmens.config import AggregationConfig
    from rmens.reward import EnsembleReward
    from tasks.mlflow_model import download_ensemble

    with tempfile.TemporaryDirectory(prefix="rmens-registered-") as tmp:
        folder = download_ensemble(uri, tmp)
        mlmodel = yaml.safe_load((folder.parents[1] / "MLmodel").read_text())
        config = mlmodel["flavors"]["python_function"].get("model_config") or {}
        reward = EnsembleReward.from_folder(folder, AggregationConfig.model_validate(config.get("aggregation", {})))
        prompts = [p.prompt for p in pairs] * 2
        responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        rewards = reward(prompts, responses).scores.float().cpu()
    margins = rewards[: len(pairs)] - rewards[len(pairs):]
    targets = torch.tensor([p.weight for p in pairs])
    return {"accuracy": pairwise_accuracy(margins, targets), "ece": calibration(margins, targets)["ece"]}


def champion_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def decide(metric: str, candidate: dict[str, float], champion: dict[str, float] | None,
           min_improvement: float) -> tuple[bool, str]:
    """Promote when there is no champion or the candidate is better by more than min_improvement."""
    if champion is None:
        return True, "no champion yet"
    better = candidate[metric] > champion[metric] + min_improvement if metric == "accuracy" \
        else candidate[metric] < champion[metric] - min_improvement
    direction = "higher" if metric == "accuracy" else "lower"
    verdict = "promoted" if better else "kept the champion"
    return better, (f"{verdict}: candidate {metric} {candidate[metric]:.4f} vs champion {champion[metric]:.4f} "
                    f"({direction} is better, margin {min_improvement})")
