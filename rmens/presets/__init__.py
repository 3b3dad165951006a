"""The built-in presets, and the one loader of them: the pipeline's (smoke, cpu, gpu: rmens/presets/<name>.yaml)
and the reference experiment's sizes (tiny, cpu, gpu-check, gpu: rmens/presets/experiment/<name>.yaml).
A preset is a YAML mapping that a config model validates after dotted `key=value` overrides."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

Family = Literal["pipeline", "experiment"]

PRESETS: dict[Family, dict[str, str]] = {
    "pipeline": {
        "smoke": "tiny random Llama, synthetic pairs; every stage in about a minute, no data or network needed",
        "cpu": "SmolLM2-135M-Instruct on the offline AlpacaEval data ($RMENS_DATA_DIR); hours on a laptop CPU",
        "gpu": "7B-class policy and reward models from Hugging Face; GPUs, a network and an OpenAI key for the "
               "judge",
    },
    "experiment": {
        "tiny": "tiny random Llama, a few pools and pairs; every step in under 2 minutes on a CPU (tested)",
        "cpu": "SmolLM2-135M, small pair sets, short contexts and pools; under 90 minutes on 2 CPU cores",
        "gpu-check": "SmolLM2-135M at 384+ tokens; the reward/Best-of-n part and the PPO part each a few GPU "
                     "minutes",
        "gpu": "SmolLM2-135M on about 10,000 pairs at 512 tokens, every arm; what a user with one GPU runs",
    },
}
_FOLDER: dict[Family, tuple[str, ...]] = {"pipeline": (), "experiment": ("experiment",)}


def preset_data(name: str, family: Family = "pipeline") -> dict[str, Any]:
    """The YAML mapping of a built-in preset; an unknown name is one error listing the known ones."""
    from rmens.config import load_yaml

    if name not in PRESETS[family]:
        what = "preset" if family == "pipeline" else "experiment size"
        raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(PRESETS[family])}")
    return load_yaml(Path(str(resources.files("rmens").joinpath("presets", *_FOLDER[family], f"{name}.yaml"))))


def with_overrides(name: str, overrides: list[str] | None = None, family: Family = "pipeline") -> dict[str, Any]:
    """A preset's mapping with dotted `key=value` overrides applied (not yet validated)."""
    from rmens.config import apply_overrides

    return apply_overrides(preset_data(name, family), overrides or [])
