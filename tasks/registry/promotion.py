"""Promotion in the MLflow model registry: score registered ensembles on held-out pairs and move the champion
aliases, once per candidate version."""

from __future__ import annotations

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.transactions import IsolationLevel
from pydantic import BaseModel

from rmens.data.schema import PreferencePair
from rmens.evaluation.rm_metrics import calibration, pairwise_accuracy
from tasks.runtime.locks import ProjectLockManager
from tasks.runtime.paths import ProjectPaths


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


class Decision(BaseModel):
    """What a retrain decided about a freshly registered candidate, and why; made once per candidate version
    (decide_once), by the run named in `decided_by`."""

    promote: bool
    reason: str
    candidate_version: str
    champion_version: str | None  # before the decision
    candidate: dict[str, float]
    champion: dict[str, float] | None
    decided_by: str | None = None  # the MLflow parent run of the retrain that decided

    @property
    def champion_after(self) -> str | None:
        return self.candidate_version if self.promote else self.champion_version

    def markdown(self, name: str, outcome: str) -> str:
        rows = [f"| candidate | {self.candidate_version} | {self.candidate['accuracy']:.4f} | "
                f"{self.candidate['ece']:.4f} |"]
        if self.champion is not None and self.champion_version:
            rows.append(f"| champion | {self.champion_version} | {self.champion['accuracy']:.4f} | "
                        f"{self.champion['ece']:.4f} |")
        return (f"# Retrain: {name}\n\n**{outcome}** — {self.reason}\n\n"
                "| model | version | accuracy | ECE |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def promote_if_better(client: MlflowClient, name: str, aliases: list[str], candidate_version: str,
                      held_out: list[PreferencePair], metric: str, min_improvement: float,
                      decided_by: str | None = None) -> Decision:
    """Score the candidate and the current champion (the version of `aliases[0]`) on the same held-out pairs,
    move every alias in `aliases` to the candidate only when it is better, and record the reason on the
    candidate's model version."""
    alias = aliases[0]
    current = champion_version(client, name, alias)
    candidate = score_registered(f"models:/{name}/{candidate_version}", held_out)
    if current == candidate_version:
        promote, reason = False, f"the candidate (version {current}) already is the champion: nothing changed"
        champion = candidate
    else:
        champion = score_registered(f"models:/{name}@{alias}", held_out) if current else None
        promote, reason = decide(metric, candidate, champion, min_improvement)
    if promote:
        for each in aliases:
            client.set_registered_model_alias(name, each, candidate_version)
    client.set_model_version_tag(name, candidate_version, "rmens.retrain_decision", reason)
    return Decision(promote=promote, reason=reason, candidate_version=candidate_version, champion_version=current,
                    candidate=candidate, champion=champion, decided_by=decided_by)


@task(name="promote", persist_result=True, result_serializer="json")
def _decide(tracking_uri: str, name: str, aliases: list[str], candidate_version: str,
            held_out: list[PreferencePair], metric: str, min_improvement: float, decided_by: str) -> Decision:
    return promote_if_better(MlflowClient(tracking_uri), name, aliases, candidate_version, held_out, metric,
                             min_improvement, decided_by)


def decide_once(paths: ProjectPaths, name: str, aliases: list[str], candidate_version: str,
                held_out: list[PreferencePair], metric: str, min_improvement: float,
                decided_by: str) -> tuple[Decision, bool]:
    """promote_if_better once per registered candidate version, whoever asks: (the decision, whether this call
    made it). Two retrain runs started together reuse one trained and registered version; deciding in both
    let both record "promoted". So the decision is a Prefect task cached under the version (and the run that
    registered it, as a rebuilt store numbers versions from 1 again), with SERIALIZABLE isolation on the
    project's lock: the second run waits for the first's decision and reads it from the cache."""
    tracking_uri = paths.tracking_uri
    source_run = MlflowClient(tracking_uri).get_model_version(name, candidate_version).run_id
    key = f"promote-{name}-v{candidate_version}-{source_run}"
    policy = CacheKeyFnPolicy(cache_key_fn=lambda context, parameters: key).configure(
        isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=ProjectLockManager(lock_files_directory=paths.locks))
    state = _decide.with_options(cache_policy=policy, result_storage=paths.results,
                                 task_run_name=f"promote:v{candidate_version}")(
        tracking_uri, name, aliases, candidate_version, held_out, metric, min_improvement, decided_by,
        return_state=True)
    return Decision.model_validate(state.result()), state.name != "Cached"
