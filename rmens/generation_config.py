"""How a policy samples (rmens.generation): one config beside the module that uses it, as TRL keeps a
config beside each trainer (rmens.generation imports torch; loading a config must not)."""

from __future__ import annotations

from pydantic import Field

from rmens.config import Seed, StrictModel


class GenerationConfig(StrictModel):
    """Sampling from a policy with its chat template."""

    max_new_tokens: int = Field(64, ge=1, description="Longest response, in tokens; a longer one is cut.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of sampling; ignored when greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this "
                                                      "probability (1: no truncation); ignored when greedy.")
    do_sample: bool = Field(True, description="False: greedy decoding (judges, deterministic answers).")
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call; the main speed knob.")
    seed: Seed = Field(0, description="Seeds the sampling of every batch.")
