"""How long a sequence a backbone takes, told without building or loading it (no torch import), so that
a `max_length` beyond it is refused before any work: a built-in alias by its known context, a local
folder by its config.json, a Hugging Face id through transformers' AutoConfig."""

from __future__ import annotations

import json
from pathlib import Path

SMOLLM2_ALIAS = "smollm2-135m"
TINY_ALIAS = "tiny-random-llama"
# The built-in aliases' positions: SmolLM2-135M-Instruct's config, and what rmens.models.backbone builds.
ALIAS_CONTEXT = {SMOLLM2_ALIAS: 8192, TINY_ALIAS: 512}
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_field(config: dict) -> tuple[str, int]:
    """(field name, value) of the longest sequence a model config's positions support."""
    for name in CONTEXT_FIELDS:
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            return name, value
    raise ValueError(f"cannot tell the context length of a {config.get('model_type', 'model')} config")


def backbone_context(backbone: str) -> tuple[str, int]:
    if backbone in ALIAS_CONTEXT:
        return "max_position_embeddings", ALIAS_CONTEXT[backbone]
    folder = Path(backbone).expanduser()
    if (folder / "config.json").is_file():
        return context_field(json.loads((folder / "config.json").read_text()))
    if folder.exists():
        raise FileNotFoundError(f"{backbone} is not a model folder (no config.json)")
    from transformers import AutoConfig

    try:
        return context_field(AutoConfig.from_pretrained(backbone).to_dict())
    except OSError as err:  # not in the Hugging Face cache and no network, or no such model id
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"model {backbone!r} is not a built-in alias, a local folder or a Hugging Face "
                                f"id reachable from here ({first})") from None


def check_max_length(backbone: str, max_length: int, field: str = "ensemble.max_length") -> None:
    """Refuse a `max_length` beyond the backbone's positions; `field` names the setting in the error."""
    name, context = backbone_context(backbone)
    if max_length > context:
        raise ValueError(f"{field}={max_length} exceeds the context of {backbone}: its {name} is {context}")


def check_max_lengths(ensembles: dict) -> None:
    """check_max_length for each {section name: EnsembleConfig}, e.g. {"judge.ensemble": ...}."""
    for section, config in ensembles.items():
        check_max_length(config.backbone, config.max_length, f"{section}.max_length")
