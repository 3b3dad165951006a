"""The machinery every config shares; the configs themselves live beside the code they configure.

Each stage's config is a pydantic model in its own package (rmens.models.config: the ensemble and its rules,
rmens.training.config, rmens.data.config, rmens.generation_config, rmens.bon_config, rmens.ppo.config; the
arms both pipelines compare in rmens.arms; rmens.pipeline.config and rmens.experiment.config compose them).
All derive from `StrictModel`, so a wrong key or a value out of range fails the same way from the Python
API, the YAML presets in ``rmens/presets/``, the command line and Prefect's flow parameters: with a
pydantic error that names the field. Derived configs go through `derive`, which validates them again.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Learning rates (reward training, its LoRA stage, PPO) are step sizes of Adam-family optimizers, which move
# each weight by about `lr` per step: above 1 every step is larger than the weights themselves, so such a
# value is a typo (1e30 for 1e-3) and never a working setting. The same bound keeps weight decay, which
# AdamW applies as `w *= 1 - lr * weight_decay`, from flipping or zeroing the weights in one step.
MAX_LR = 1.0
MAX_WEIGHT_DECAY = 1.0


def _registered_name(value: str) -> str:
    """MLflow refuses a registered model name with '/' or ':', but only when the first model is registered,
    after training: checked when the config loads instead."""
    if not value.strip() or "/" in value or ":" in value:
        raise ValueError(f"{value!r} cannot name an MLflow registered model (empty, or with '/' or ':')")
    return value


def _alias(value: str) -> str:
    """A label that becomes a registered version's alias: letters, digits, '_' and '-', not 'latest' or 'v<N>'
    (MLflow's rules, checked when the config loads rather than after training)."""
    if not re.fullmatch(r"[\w\-]{1,255}", value) or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
        raise ValueError(f"{value!r} cannot be a registered model alias: use letters, digits, '_' and '-' "
                         "(not 'latest' or v<N>)")
    return value


RegisteredName = Annotated[str, AfterValidator(_registered_name)]
Alias = Annotated[str, AfterValidator(_alias)]

# A seed every random stream derives its own from (rmens.seeding): 32 bits, so that a bad one fails when the
# config loads, not when the first stream is drawn after hours of training.
Seed = Annotated[int, Field(ge=0, lt=2**32)]


class ConfigError(ValueError):
    """A config file, preset or override that cannot be read; the message names the file and line, or the key."""


def _is_number(annotation: Any) -> bool:
    """Whether a field's type is int or float (possibly optional or constrained) and not also a bool."""
    if get_origin(annotation) is Annotated:
        return _is_number(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return bool(args) and all(_is_number(arg) for arg in args)
    return annotation in (int, float)


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, not silently ignored; so are non-finite floats
    (`.inf`, `nan`) and booleans where a number belongs (pydantic would read `k: true` as k=1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # Settings a model no longer has, each with where its job is done now: a config that still sets one is
    # told so in one line, instead of only "Extra inputs are not permitted".
    retired: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _no_retired_settings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in sorted(cls.retired.keys() & data.keys()):
                raise ValueError(f"{name} is no longer a setting; {cls.retired[name]}")
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Numbers written as text stay accepted ("1e-5": PyYAML reads exponents without a dot as strings),
        # and so do ints for floats; only a boolean passing as a number is refused.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _is_number(annotation):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        if (isinstance(value, (list, tuple)) and get_origin(annotation) is list and get_args(annotation)
                and _is_number(get_args(annotation)[0]) and any(isinstance(item, bool) for item in value)):
            raise ValueError(f"expected a list of numbers, got {value!r}")
        return value


def refuse_replaced(section: BaseModel, name: str, owners: dict[str, str]) -> None:
    """A setting that the enclosing config replaces from elsewhere must keep its default: a value a user gave
    it would be silently ignored, so that is an error naming the setting that decides instead. (Compared with
    the default, not with what was written: a config dumped and validated again, as Prefect's parameters are,
    writes every field.)"""
    for field in sorted(owners):
        default = type(section).model_fields[field].get_default(call_default_factory=True)
        if getattr(section, field) != default:
            raise ValueError(f"{name}.{field} is ignored here ({owners[field]}); remove it")

def derive(config: BaseModel, **changes: Any) -> Any:
    """A copy of `config` with `changes` applied (nested mappings merge) and validated as a new object;
    pydantic's model_copy with an update would skip validation and let an inconsistent combination through."""
    dumped = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in changes.items()}
    return type(config).model_validate(merge(config.model_dump(), dumped))


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` layered over `base`: mappings merge key by key at every depth; anything else replaces."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping with one key twice is an error: PyYAML keeps the last value
    silently, so `lr: 1e-5` written twice in a config would decide nothing visible."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            seen = key in first
        except TypeError:  # an unhashable key: the constructor below says so
            continue
        if seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first at line {first[key]})",
                                                    key_node.start_mark)
        first[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text read from `source` (a file name, or what else it came from); a syntax error or a key given
    twice is a ConfigError naming the source, line and column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise ConfigError(f"{where}: invalid YAML ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What PyYAML says is wrong, in one line and without its own (nameless) position."""
    context, mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and mark is not None:
        context += f" at line {mark.line + 1}, column {mark.column + 1}"
    what = ": ".join(part for part in (context, getattr(err, "problem", None)) if part)
    return what or " ".join(str(err).split())


def _read_yaml_file(path: str | Path) -> Any:
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
    return parse_yaml(text, str(path))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = _read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config file must be a mapping")
    return data


def flatten(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config to dotted keys (for tracking params and cache keys)."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# Settings a reader compares tracked runs by even at their defaults: what model, what kind of ensemble.
IDENTIFYING = ("backbone", "kind", "k", "policy", "ensemble.backbone", "ensemble.kind", "ensemble.k")


def flatten_set(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """`flatten` of the settings that differ from their defaults (a required field always counts) and the
    identifying ones: the params a reader of a tracked run needs; the whole config goes beside them as a file."""
    defaults = flatten(type(config).model_construct(), prefix)
    return {key: value for key, value in flatten(config, prefix).items()
            if key not in defaults or defaults[key] != value or key.removeprefix(prefix) in IDENTIFYING}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to a nested config mapping."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1], start=1):
            value = node.get(part)
            if value is not None and not isinstance(value, dict):
                section = ".".join(parts[:depth])
                what = "a list" if isinstance(value, list) else f"the value {value!r:.40}"
                raise ConfigError(f"override {item!r}: {section} is {what}, not a section with fields; "
                                  f"set {section}=... as a whole")
            node[part] = dict(value or {})
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
    return data
