"""Steps that more than one flow composes: the gold judge, the matrix of reward-model arms, one ensemble.
Flows share them through this module instead of importing each other."""

from __future__ import annotations

from rmens.config import Arm, PipelineConfig, TrainFlowConfig
from tasks.prepare_data import prepare_data
from tasks.prepare_models import prepare_models
from tasks.runtime.refs import ArtifactRef
from tasks.runtime.stager import Stager
from tasks.train_ensemble import train_ensemble


def train_judge(stage: Stager, config) -> ArtifactRef | None:
    """The offline gold judge: a reward model trained on many more pairs than the arms see."""
    if config.judge.kind != "reward_model":
        return None
    data = stage(prepare_data, "judge", data=config.judge.data)
    return stage(train_ensemble, "judge", data=data, ensemble=config.judge.ensemble, train_cfg=config.judge.train,
                 label="judge", registered_model=None, log_model=False)


def train_arms(stage: Stager, config: PipelineConfig, data: ArtifactRef) -> dict[Arm, ArtifactRef]:
    """Every arm's reward model, trained once for all its rules."""
    return {arm: stage(train_ensemble, arm.label, tags=arm.describe(), data=data, train_cfg=config.train,
                       label=arm.label, ensemble=arm.ensemble(config.ensemble),
                       registered_model=config.registered_model, log_model=config.log_models)
            for arm in config.arms.arms()}


def train_one(stage: Stager, config: TrainFlowConfig) -> tuple[ArtifactRef, ArtifactRef]:
    """(data, ensemble) of the train and retrain flows."""
    stage(prepare_models, "models", names=[config.ensemble.backbone])
    data = stage(prepare_data, config.label, data=config.data)
    model = stage(train_ensemble, config.label, data=data, ensemble=config.ensemble, train_cfg=config.train,
                  label=config.label, registered_model=config.registered_model, log_model=config.log_model)
    return data, model

