"""Member standardisation: each member's reward mapped to mean 0, sd 1 over a calibration set.

A Bradley-Terry loss sees only reward differences, so a member's offset is arbitrary (and its scale
nearly so). Conservative rules (min, lcb, uwo) compare members' raw rewards, so those arbitrary offsets
would decide them. Every use of an ensemble therefore standardises each member, with statistics
computed once on training responses and saved with the ensemble, before any rule aggregates it.

The spread is the population standard deviation (ddof = 0): the statistics define a fixed affine map,
not an estimate, and with it the calibration responses come out with sd exactly 1 (with hundreds of
responses the difference from the sample sd is below 0.2%). It is also the convention of
`rmens.models.aggregate.member_std`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rmens.data.schema import PreferencePair
from rmens.seeding import Stream, seed_for

if TYPE_CHECKING:  # rmens.models.ensemble imports this module for the type
    from rmens.models.ensemble import RewardEnsemble

# A member whose sd over the calibration responses is below this share of its typical magnitude is
# constant up to float32 rounding (~6e-8 relative): dividing by that spread would blow rounding noise up
# to unit scale, and flooring it would turn the member into a constant 0 that still enters min and the
# spread of lcb/uwo. Such a member carries no ranking at all, so it is an error, not a silent fix.
MIN_RELATIVE_SCALE = 1e-6


@dataclass(frozen=True, eq=False)
class MemberStandardisation:
    """Per-member `center` [k] and `scale` [k] (float64, scale > 0) from `responses` calibration responses.

    `apply(members)` maps raw member rewards [k, n] to (raw - center) / scale. eq=False: tensor fields have
    no single truth value; compare `to_json()` instead.
    """

    center: torch.Tensor
    scale: torch.Tensor
    responses: int

    def __post_init__(self) -> None:
        if self.center.dim() != 1 or self.center.shape != self.scale.shape:
            raise ValueError(f"standardisation center {tuple(self.center.shape)} and scale "
                             f"{tuple(self.scale.shape)} must both be [k]")
        if not (torch.isfinite(self.center).all() and torch.isfinite(self.scale).all()):
            raise ValueError("standardisation center and scale must be finite")
        if not bool((self.scale > 0).all()):
            raise ValueError(f"standardisation scale must be positive, got {self.scale.tolist()}")
        if self.responses < 1:
            raise ValueError(f"standardisation responses must be at least 1, got {self.responses}")

    @property
    def k(self) -> int:
        return self.center.shape[0]

    def apply(self, members: torch.Tensor) -> torch.Tensor:
        """[k, n] raw member rewards -> [k, n] standardised, in the input's dtype."""
        if members.dim() != 2 or members.shape[0] != self.k:
            raise ValueError(f"member rewards {tuple(members.shape)} do not match the standardisation of "
                             f"{self.k} members")
        center, scale = self.center.to(members.device), self.scale.to(members.device)
        return ((members.double() - center[:, None]) / scale[:, None]).to(members.dtype)

    def fold_into_heads(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Linear heads ([k, H] weight, [k] bias) whose outputs are the standardised rewards."""
        scale, center = self.scale.to(weight.dtype), self.center.to(weight.dtype)
        return weight / scale[:, None], (bias - center) / scale

    def to_json(self) -> dict:
        return {"center": self.center.tolist(), "scale": self.scale.tolist(), "responses": self.responses}

    @classmethod
    def concat(cls, parts: list[MemberStandardisation]) -> MemberStandardisation:
        """The members of `parts` in order, as one standardisation (a full ensemble assembled from members
        standardised one by one, on the same calibration responses)."""
        counts = sorted({part.responses for part in parts})
        if len(counts) > 1:
            raise ValueError(f"standardisations calibrated on {counts} responses cannot be joined: every member "
                             "is calibrated on the same responses")
        return cls(torch.cat([part.center for part in parts]), torch.cat([part.scale for part in parts]), counts[0])

    @classmethod
    def from_json(cls, data: object, where: str) -> MemberStandardisation:
        """Read what `to_json` wrote; `where` (file and field) names the source in errors."""
        if not isinstance(data, dict) or not {"center", "scale", "responses"} <= data.keys():
            raise ValueError(f"{where} must hold center, scale and responses")
        try:
            return cls(torch.tensor(data["center"], dtype=torch.float64),
                       torch.tensor(data["scale"], dtype=torch.float64), int(data["responses"]))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{where}: {err}") from None


def standardisation_from_scores(members: torch.Tensor) -> MemberStandardisation:
    """Mean and population sd of each member's rewards [k, n] over the n calibration responses."""
    if members.dim() != 2 or members.shape[1] < 2:
        raise ValueError(f"standardisation needs member rewards [k, n] with n >= 2 responses, got "
                         f"{tuple(members.shape)}")
    if not torch.isfinite(members).all():
        raise ValueError("standardisation needs finite member rewards")
    scores = members.double()
    center, scale = scores.mean(dim=1), scores.std(dim=1, unbiased=False)
    constant = (scale <= MIN_RELATIVE_SCALE * scores.abs().mean(dim=1).clamp(min=1.0)).nonzero().flatten().tolist()
    if constant:
        raise ValueError(f"member(s) {constant} give the same reward to all {members.shape[1]} calibration responses "
                         "(sd 0): such a member ranks nothing and cannot be standardised; retrain or drop it")
    return MemberStandardisation(center, scale, int(members.shape[1]))


def calibration_subset(pairs: list[PreferencePair], max_pairs: int, seed: int) -> list[PreferencePair]:
    """Up to `max_pairs` pairs drawn without replacement, in an order fixed by `seed` alone."""
    generator = torch.Generator().manual_seed(seed_for(seed, Stream.CALIBRATION))
    order = torch.randperm(len(pairs), generator=generator)[:max_pairs].tolist()
    return [pairs[i] for i in order]


def pair_responses(pairs: list[PreferencePair]) -> tuple[list, list[str]]:
    """(prompts, responses) of both sides of the pairs: every chosen, then every rejected response."""
    return [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]


def calibrate(ensemble: RewardEnsemble, tokenizer, prompts: list, responses: list[str],
              batch_size: int = 16) -> MemberStandardisation:
    """Score the responses with every member (raw) and standardise on them.

    Scored by EnsembleReward's own path (encoding, batching by length, autocast on a GPU), so the
    statistics describe the rewards exactly as they are later standardised.
    """
    from rmens.reward import EnsembleReward  # rmens.reward imports the ensemble, which imports this module

    was_training = ensemble.training
    try:
        reward = EnsembleReward(ensemble, tokenizer, batch_size=batch_size, allow_unstandardised=True)
        members = reward.member_scores(prompts, responses, standardise=False)
    finally:
        ensemble.train(was_training)  # scoring switches to eval mode; leave the caller's mode as it was
    return standardisation_from_scores(members)
