"""Promotion in the MLflow model registry: score registered ensembles on held-out pairs and move the champion
alias."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rmens.data.schema import PreferencePair
from rmens.evaluation.rm_metrics import calibration, pairwise_accuracy


def score_registered(uri: str, pairs: list[PreferencePair]) -> dict[str, float]:
    """Accuracy and ECE of a registered ensemble (models:/name/version or models:/name@alias), scored from its
    weights; the model's stored code is not run.

    Accuracy is that of the reward the model serves: its standardised members under the aggregation it was
    logged with. ECE is that of the ensemble's Bradley-Terry probability, sigmoid of the mean raw member
    margin (as training reports it): standardising rescales the margin, and a conservative rule's margin is
    no probability's logit, so neither would measure calibration.
    """
    import tempfile

    import yaml

    from rmens.models.aggregate import aggregate_with
    from rmens.models.config import AggregationConfig
    from rmens.reward import EnsembleReward, UnstandardisedEnsembleError
    from tasks.registry.model import download_ensemble

    with tempfile.TemporaryDirectory(prefix="rmens-registered-") as tmp:
        folder = download_ensemble(uri, tmp)
        mlmodel = yaml.safe_load((folder.parents[1] / "MLmodel").read_text())
        config = mlmodel["flavors"]["python_function"].get("model_config") or {}
        aggregation = AggregationConfig.model_validate(config.get("aggregation", {}))
        try:
            reward = EnsembleReward.from_folder(folder, aggregation)
        except UnstandardisedEnsembleError:
            raise UnstandardisedEnsembleError(
                f"{uri} was registered without member standardisation statistics (k > 1); download its ensemble "
                "folder, add them with `python -m rmens.cli calibrate FOLDER --pairs TRAIN_PAIRS.jsonl` and "
                "register it again") from None
        prompts = [p.prompt for p in pairs] * 2
        responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        raw = reward.member_scores(prompts, responses, standardise=False).double()
        served = aggregate_with(reward.standardised(raw), aggregation)
    n = len(pairs)
    targets = torch.tensor([p.weight for p in pairs])
    margins, raw_margins = served[:n] - served[n:], (raw[:, :n] - raw[:, n:]).mean(dim=0)
    return {"accuracy": pairwise_accuracy(margins, targets), "ece": calibration(raw_margins, targets)["ece"]}


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


@dataclass
class Decision:
    """What the retrain flow decided about a freshly registered candidate, and why."""

    promote: bool
    reason: str
    candidate_version: str
    champion_version: str | None  # before the decision
    candidate: dict[str, float]
    champion: dict[str, float] | None

    @property
    def champion_after(self) -> str | None:
        return self.candidate_version if self.promote else self.champion_version

    def markdown(self, name: str) -> str:
        rows = [f"| candidate | {self.candidate_version} | {self.candidate['accuracy']:.4f} | "
                f"{self.candidate['ece']:.4f} |"]
        if self.champion is not None and self.champion_version:
            rows.append(f"| champion | {self.champion_version} | {self.champion['accuracy']:.4f} | "
                        f"{self.champion['ece']:.4f} |")
        return (f"# Retrain: {name}\n\n**{'Promoted' if self.promote else 'Kept the champion'}** — {self.reason}\n\n"
                "| model | version | accuracy | ECE |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def promote_if_better(client: MlflowClient, name: str, alias: str, candidate_version: str,
                      held_out: list[PreferencePair], metric: str, min_improvement: float) -> Decision:
    """Score the candidate and the current champion on the same held-out pairs, move `alias` to the candidate
    only when it is better, and record the reason on the candidate's model version."""
    current = champion_version(client, name, alias)
    candidate = score_registered(f"models:/{name}/{candidate_version}", held_out)
    if current == candidate_version:
        promote, reason = False, f"the candidate (version {current}) already is the champion: nothing changed"
        champion = candidate
    else:
        champion = score_registered(f"models:/{name}@{alias}", held_out) if current else None
        promote, reason = decide(metric, candidate, champion, min_improvement)
    if promote:
        client.set_registered_model_alias(name, alias, candidate_version)
    client.set_model_version_tag(name, candidate_version, "rmens.retrain_decision", reason)
    return Decision(promote, reason, candidate_version, current, candidate, champion)
