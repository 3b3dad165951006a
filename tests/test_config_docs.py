"""Every setting says what it is: each field of each pydantic model in the rmens package has a description."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, get_args

from pydantic import BaseModel

import rmens


def _subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct} | _subclasses(direct)}


def _models_in(annotation: Any) -> set[type[BaseModel]]:
    """The pydantic models an annotation names, at any depth (list[X], X | None, Annotated[X, ...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    return {model for arg in get_args(annotation) for model in _models_in(arg)}


def rmens_models() -> set[type[BaseModel]]:
    """Every pydantic model defined in a module of the rmens package, and every model their fields hold."""
    for module in pkgutil.walk_packages(rmens.__path__, "rmens."):
        importlib.import_module(module.name)
    found: set[type[BaseModel]] = set()
    todo = [cls for cls in _subclasses(BaseModel) if cls.__module__.split(".")[0] == "rmens"]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.add(cls)
            todo.extend(model for field in cls.model_fields.values() for model in _models_in(field.annotation))
    return found


def undescribed(models: set[type[BaseModel]]) -> list[str]:
    """`module:Model.field` for each field without a non-empty description."""
    return sorted(f"{cls.__module__}:{cls.__name__}.{name}" for cls in models
                  for name, field in cls.model_fields.items() if not (field.description or "").strip())


def test_the_walk_finds_the_config_models():
    names = {f"{cls.__module__}:{cls.__name__}" for cls in rmens_models()}
    assert {"rmens.config:PipelineConfig", "rmens.config:LoraSettings", "rmens.config:JudgeDataConfig",
            "rmens.config:TrainJobConfig", "rmens.config:PPOJobConfig", "rmens.config:RetrainConfig",
            "rmens.experiment.config:ExperimentConfig", "rmens.experiment.config:ProxyShare"} <= names
    assert len(names) >= 35


def test_every_config_field_has_a_description():
    missing = undescribed(rmens_models())
    assert not missing, f"{len(missing)} config fields have no description: {', '.join(missing)}"


def test_a_missing_description_is_named(monkeypatch):
    from rmens.config import BonConfig

    monkeypatch.setattr(BonConfig.model_fields["n_samples"], "description", None)
    assert undescribed({BonConfig}) == ["rmens.config:BonConfig.n_samples"]
