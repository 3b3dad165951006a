"""The reward interface that Best-of-n, PPO and evaluation share.

A reward function maps (prompts, responses) to one score per example, and, when it is an ensemble, to
every member's score as well:

    reward_fn(prompts, responses) -> Rewards(scores=Tensor[batch], members=Tensor[k, batch] | None)

`EnsembleReward` wraps a RewardEnsemble with an aggregation rule and scores all members in one call
per batch; `CallableReward` wraps any Python function (tests, rule-based rewards); judges in
rmens.evaluation implement the same call.

An ensemble's members are standardised (each to mean 0, sd 1 over training responses; statistics saved
with the ensemble, see rmens.models.standardise) before the rule aggregates them: Bradley-Terry training
leaves each member's offset arbitrary, and min, lcb and uwo would otherwise compare those offsets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from rmens.data.encoding import PairEncoder, pad_batch
from rmens.models.aggregate import aggregate_with
from rmens.models.config import AggregationConfig
from rmens.models.ensemble import RewardEnsemble, load_ensemble
from rmens.models.standardise import MemberStandardisation

log = logging.getLogger(__name__)


class RewardError(ValueError):
    """A reward source returned something unusable (NaN, infinite, wrong length)."""


class UnstandardisedEnsembleError(ValueError):
    """An ensemble of several members has no standardisation statistics, so its rules would compare offsets."""


@dataclass
class Rewards:
    scores: torch.Tensor  # [batch]
    # [k, batch] for ensembles: the members the rule aggregated (EnsembleReward: standardised, unless raw asked)
    members: torch.Tensor | None = None

    def check(self, n: int, where: str) -> Rewards:
        if self.scores.shape != (n,):
            raise RewardError(f"{where}: expected {n} rewards, got shape {tuple(self.scores.shape)}")
        bad = (~torch.isfinite(self.scores)).nonzero().flatten().tolist()
        if self.members is not None:
            bad += (~torch.isfinite(self.members)).any(dim=0).nonzero().flatten().tolist()
        if bad:
            raise RewardError(f"{where}: non-finite reward for example(s) {sorted(set(bad))[:10]}")
        return self


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], responses: list[str]) -> Rewards: ...


def standardisation_in_use(ensemble: RewardEnsemble,
                           allow_unstandardised: bool = False) -> MemberStandardisation | None:
    """The standardisation an EnsembleReward applies; None means raw members.

    An ensemble saved without statistics: with one member, raw scores with a warning (standardising one
    member is a monotone affine map; only the reward's scale differs); with several, an error, since the
    rules would then compare arbitrary offsets; `allow_unstandardised` accepts raw members silently.
    """
    if ensemble.standardisation is not None or allow_unstandardised:
        return ensemble.standardisation
    folder = str(ensemble.saved_at) if ensemble.saved_at is not None else "FOLDER"
    if ensemble.k == 1:
        log.warning("%s: the reward model was saved without standardisation statistics; its raw scores are used "
                    "(same ranking, another scale). Add them with: python -m rmens.cli calibrate %s --pairs "
                    "TRAIN_PAIRS.jsonl", folder, folder)
        return None
    raise UnstandardisedEnsembleError(
        f"{folder}: the ensemble (k={ensemble.k}) was saved without member standardisation statistics, so its "
        f"aggregation rules would compare the members' arbitrary offsets; add them with `python -m rmens.cli "
        f"calibrate {folder} --pairs TRAIN_PAIRS.jsonl` (its training pairs), or pass allow_unstandardised=True")


class EnsembleReward:
    """Aggregated ensemble reward; every member is scored in the same forward.

    Members are standardised with the ensemble's saved statistics before the rule aggregates them, and
    `Rewards.members` holds them standardised; `standardise=False` (member_scores, __call__) gives the
    raw Bradley-Terry scores, which probabilities (sigmoid of a difference), accuracy and calibration need.

    precision: 'auto' scores under bf16 autocast on a GPU that supports it (5x faster than fp32 on an
    H200 for the same batch) and in fp32 elsewhere (bf16 is several times slower on most CPUs).
    allow_unstandardised: accept an ensemble without standardisation statistics (a folder saved before they
    existed, or a fresh untrained ensemble) and use its raw members without a warning or error; for callers
    that need only raw scores, or that know the members share offset and scale (see standardisation_in_use).
    """

    def __init__(self, ensemble: RewardEnsemble, tokenizer, aggregation: AggregationConfig | None = None,
                 batch_size: int = 16, max_length: int | None = None, precision: str = "auto",
                 allow_unstandardised: bool = False):
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
        self.standardisation = standardisation_in_use(ensemble, allow_unstandardised)
        self.ensemble = ensemble.eval()
        self.aggregation = aggregation or AggregationConfig()
        self.batch_size = batch_size
        self.precision = precision
        length = max_length or ensemble.config.max_length
        self.encoder = PairEncoder(tokenizer, length, ensemble.config.max_prompt_length)
        self.pad_id = tokenizer.pad_token_id

    @classmethod
    def from_folder(cls, path: str | Path, aggregation: AggregationConfig | None = None,
                    device: str | torch.device | None = None, **kwargs) -> EnsembleReward:
        """A saved ensemble, on `device` (default: the GPU when there is one, else the CPU)."""
        ensemble, tokenizer = load_ensemble(path)
        if tokenizer is None:
            raise FileNotFoundError(f"{path} holds no tokenizer/ folder; save the ensemble with its tokenizer")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(ensemble.to(device), tokenizer, aggregation, **kwargs)

    @property
    def k(self) -> int:
        return self.ensemble.k

    def uses_bf16(self, device: torch.device) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda"
                                            and torch.cuda.is_bf16_supported())

    def _autocast(self, device: torch.device):
        # The backbone under bf16; the heads stay in fp32 (RewardEnsemble turns autocast off for them).
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.uses_bf16(device))

    def member_scores(self, prompts: list[str], responses: list[str], standardise: bool = True) -> torch.Tensor:
        """[k, n] member rewards, standardised (the default; raw where the ensemble has no statistics and
        that was allowed) or raw Bradley-Terry scores with `standardise=False`."""
        raw = self._raw_member_scores(prompts, responses)
        return self.standardised(raw) if standardise else raw

    def standardised(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw member rewards [k, n] -> what the rule aggregates (unchanged without statistics)."""
        return raw if self.standardisation is None else self.standardisation.apply(raw)

    @torch.no_grad()
    def _raw_member_scores(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """[k, n] raw member rewards: the one scoring path. Tokenised in one batched call, batched by length
        (little padding), and kept on the device until the end (no synchronisation per batch)."""
        seqs = self.encoder.encode_batch(prompts, responses)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        device = next(self.ensemble.parameters()).device
        parts = []
        with self._autocast(device):
            for start in range(0, len(order), self.batch_size):
                batch = pad_batch([seqs[i] for i in order[start: start + self.batch_size]], self.pad_id)
                parts.append(self.ensemble(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).float())
        out = torch.empty(self.ensemble.k, len(seqs))
        if parts:
            out[:, order] = torch.cat(parts, dim=1).cpu()
        return out

    def __call__(self, prompts: list[str], responses: list[str], *, standardise: bool = True) -> Rewards:
        """The rule over the standardised members (or over the raw ones with `standardise=False`)."""
        # Not checked here: aggregation refuses non-finite member rewards, and whoever consumes a reward
        # function (PPO, Best-of-n) checks what enters it, whatever its source.
        members = self.member_scores(prompts, responses, standardise)
        return Rewards(scores=aggregate_with(members, self.aggregation), members=members)


class CallableReward:
    """Wraps `fn(prompt, response) -> float` as a reward function."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, prompts: list[str], responses: list[str]) -> Rewards:
        scores = torch.tensor([float(self.fn(p, r)) for p, r in zip(prompts, responses)])
        return Rewards(scores=scores).check(len(prompts), "reward function")


@contextmanager
def placed_reward(folder: str | Path, aggregation: AggregationConfig | None = None,
                  devices: int = 0) -> Iterator[RewardFn]:
    """A saved ensemble's reward for PPO: in this process (devices 0), or in a Ray actor holding `devices`
    accelerators of its own (rmens.integrations.ray), stopped when the block ends."""
    if not devices:
        yield EnsembleReward.from_folder(folder, aggregation)
        return
    from rmens.integrations.ray import RemoteReward

    remote = RemoteReward(folder, aggregation, devices)
    try:
        yield remote
    finally:
        remote.close()
