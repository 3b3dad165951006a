"""Every setting says what it is: each field of each pydantic model in the rmens package has a description."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
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


def defined_models() -> set[str]:
    """`module:Model` of every class in the rmens source whose bases name a pydantic model (BaseModel, or a class
    found so, at any depth), read from the files themselves: a model in a module the walk above does not import
    (a folder without __init__.py, say) is still counted, so the walk cannot miss one silently."""
    root = Path(rmens.__file__).parent
    bases: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                names = {getattr(base, "id", None) or getattr(base, "attr", "") for base in node.bases}
                bases[f"{module}:{node.name}"] = names
    models, named = set(), {"BaseModel"}
    while new := {name for name, of in bases.items() if of & named} - models:
        models |= new
        named |= {name.split(":")[1] for name in new}
    return models


def _names(models: set[type[BaseModel]]) -> set[str]:
    return {f"{cls.__module__}:{cls.__name__}" for cls in models}


def undescribed(models: set[type[BaseModel]]) -> list[str]:
    """`module:Model.field` for each field without a non-empty description."""
    return sorted(f"{cls.__module__}:{cls.__name__}.{name}" for cls in models
                  for name, field in cls.model_fields.items() if not (field.description or "").strip())


def test_the_walk_finds_every_config_model_wherever_it_lives():
    names = _names(rmens_models())
    defined = defined_models()
    assert defined <= names, f"models the walk missed: {sorted(defined - names)}"
    assert {"rmens.pipeline.config:PipelineConfig", "rmens.models.config:LoraSettings", "rmens.arms:Arm",
            "rmens.arms:PPOArm", "rmens.pipeline.config:GoldDataConfig", "rmens.training.config:TrainJobConfig",
            "rmens.ppo.config:PPOJobConfig", "rmens.pipeline.config:RetrainConfig", "rmens.bon_config:BonConfig",
            "rmens.generation_config:GenerationConfig", "rmens.data.config:PromptsConfig",
            "rmens.experiment.config:ExperimentConfig", "rmens.experiment.config:ProxyShare"} <= defined
    assert len(defined) >= 35


def test_every_config_field_has_a_description():
    missing = undescribed(rmens_models())
    assert not missing, f"{len(missing)} config fields have no description: {', '.join(missing)}"


def test_a_missing_description_is_named(monkeypatch):
    from rmens.bon_config import BonConfig

    monkeypatch.setattr(BonConfig.model_fields["n_samples"], "description", None)
    assert undescribed({BonConfig}) == ["rmens.bon_config:BonConfig.n_samples"]
