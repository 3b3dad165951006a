"""Deterministic splits by instruction, label noise, and per-member data assignment."""

from __future__ import annotations

import dataclasses
import hashlib

from rmens.data.schema import PreferencePair
from rmens.seeding import python_random


def unit_hash(text: str, salt: str) -> float:
    """A stable number in [0, 1) for a string: the same on every machine and Python run."""
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_alpaca_eval_test(instruction: str) -> bool:
    """AlpacaEval's test instructions in the offline data: int(sha256(instruction), 16) % 4 == 0."""
    return int(hashlib.sha256(instruction.encode()).hexdigest(), 16) % 4 == 0


def split_by_instruction(
    pairs: list[PreferencePair], fraction: float, salt: str = "val"
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split so that every prompt lands wholly on one side: (rest, held-out fraction).

    The split depends only on the prompt text and the salt, so adding pairs never moves old ones.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    rest, held = [], []
    for pair in pairs:
        (held if unit_hash(pair.prompt, salt) < fraction else rest).append(pair)
    return rest, held


def flip_labels(pairs: list[PreferencePair], fraction: float, seed: int) -> list[PreferencePair]:
    """Swap chosen and rejected on exactly round(fraction * n) pairs picked by a seeded RNG (Coste et al.)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {fraction}")
    n_flip = round(fraction * len(pairs))
    flipped = set(python_random(seed).sample(range(len(pairs)), n_flip))
    return [
        dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen, source={**p.source, "label_flipped": True})
        if i in flipped else p
        for i, p in enumerate(pairs)
    ]


def member_weights(n_pairs: int, k: int, diversity: str, seed: int):
    """How much each member trains on each pair, as a [k, n_pairs] float tensor.

    seed: every member sees every pair (weight 1); members differ by initialisation.
    bootstrap: member i's weights are the counts of a seeded resample with replacement (Poisson-like,
      mean 1), which is exactly bootstrap bagging expressed as per-pair loss weights.
    disjoint: pairs are dealt to members by a seeded permutation; a member sees only its share.
    Expressing all three as weights keeps one batch and one backward for all members.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    if diversity == "seed":
        return torch.ones(k, n_pairs)
    if diversity == "bootstrap":
        draws = torch.randint(0, n_pairs, (k, n_pairs), generator=generator)
        counts = torch.zeros(k, n_pairs)
        counts.scatter_add_(1, draws, torch.ones(k, n_pairs))
        return counts
    if diversity == "disjoint":
        if n_pairs < k:
            raise ValueError(f"diversity='disjoint' needs at least k={k} pairs, got {n_pairs}")
        owner = torch.randperm(n_pairs, generator=generator) % k
        return (owner.unsqueeze(0) == torch.arange(k).unsqueeze(1)).float()
    raise ValueError(f"unknown diversity {diversity!r}; choose seed, bootstrap or disjoint")
