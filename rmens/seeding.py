"""The seed of every random stream, derived from a run's seed in one way.

Each random choice (member i's head and adapter, a training phase's data order in an epoch, the
bootstrap weights, a batch of samples, PPO's prompt and minibatch orders) draws from its own generator,
seeded by (run seed, which stream, its indices). numpy's SeedSequence does the mixing: its spawn keys
give statistically independent seeds for distinct keys, so a stream does not move when another is added,
and member i's draws do not depend on k.

The standard library's sampling (random.sample, choice) takes its generator from python_random.
"""

from __future__ import annotations

import random
from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """What a seed is for (the first spawn key). Append new streams: renumbering moves old results."""

    HEAD = 0            # member i's reward head (init_heads)
    ADAPTER = 1         # member i's LoRA adapter
    DATA_ORDER = 2      # a training phase's batch order, per epoch
    MEMBER_WEIGHTS = 3  # bootstrap / disjoint weights of a set of pairs
    SAMPLE = 4          # a batch of sampled responses (Best-of-n samples, MT-Bench answers)
    ROLLOUT = 5         # a batch of PPO's rollouts, per step and process
    EVAL_SAMPLE = 6     # a batch of a policy's responses for its evaluation (every policy: common noise)
    PROMPT_ORDER = 7    # PPO's per-epoch prompt permutation
    MINIBATCH = 8       # PPO's minibatch order within a step
    VALUE_HEAD = 9      # PPO's fresh value head
    CALIBRATION = 10    # the training pairs whose responses standardise each member's reward
    RUN = 11            # a training run (seed) of a reference-experiment arm
    MEMBER_TRAINING = 12  # the global generators (dropout) while member i of a full ensemble trains


def seed_for(seed: int, stream: Stream, *indices: int) -> int:
    """A 63-bit seed for `stream` at `indices` (e.g. member, epoch, step, process) under the run's `seed`."""
    # SeedSequence splits a larger int into 32-bit words, so (2**32 + 1, 0) would read as (1, 1, 0).
    if not all(0 <= value < 2**32 for value in (seed, *indices)):
        raise ValueError(f"seeds and stream indices are in [0, 2**32), got {seed} and {indices}")
    state = np.random.SeedSequence(seed, spawn_key=(int(stream), *indices)).generate_state(1, np.uint64)[0]
    return int(state) >> 1  # torch generators take up to 64 bits; one less keeps it a positive int64 too


def python_random(seed: int, purpose: str | None = None) -> random.Random:
    """A python `random.Random` seeded by `seed`, or, with a `purpose`, by the text f"{seed}\\x00{purpose}"
    (Random hashes text with SHA-512), so that each purpose (e.g. a pool's instruction) draws on its own.

    Not mixed through seed_for: these are the exact seeds the data subsets, label flips and pool cuts were
    drawn with, and changing them would move every published number.
    """
    return random.Random(seed if purpose is None else f"{seed}\x00{purpose}")
