"""Best-of-n's draws (rmens.bon): how many samples per prompt, and how the policy draws them (beside
rmens.bon, which imports torch; loading a config must not)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from rmens.config import StrictModel
from rmens.generation_config import GenerationConfig


class BonConfig(StrictModel):
    """Best-of-n: draw N samples per prompt once, score them with every scorer, report n = 1, 2, 4 ... N."""

    n_samples: int = Field(16, ge=1, description="N, samples drawn per prompt.")
    generation: GenerationConfig = Field(default_factory=lambda: GenerationConfig(temperature=1.0, top_p=0.9),
                                         description="How the initial policy draws the samples.")

    retired: ClassVar[dict[str, str]] = {
        "select_n": "set evaluate.bon_select_n (the n whose Best-of-n picks are written and evaluated)",
        "n_prompts": "set bon_prompts.max_prompts (a seeded subset of that many prompts)"}
