"""One derivation for every random stream: distinct streams and indices never share a seed, and member i's
draws do not depend on how many members there are."""

import random

import pytest
import torch

from rmens.models.ensemble import init_heads
from rmens.seeding import Stream, python_random, seed_for


def test_each_stream_and_index_gets_its_own_reproducible_seed():
    seeds = {seed_for(s, stream, *idx) for s in (0, 1) for stream in Stream for idx in [(), (0,), (1,), (0, 1), (1, 0)]}
    assert len(seeds) == 2 * len(Stream) * 5  # no two (seed, stream, indices) collide, order matters
    assert seed_for(7, Stream.ROLLOUT, 3, 0) == seed_for(7, Stream.ROLLOUT, 3, 0)
    assert all(0 <= s < 2**63 for s in seeds)  # a valid torch seed and int64
    for bad in [(-1,), (0, -1), (0, 2**32)]:  # 2**32 + 1 would read as the two words (1, 1)
        with pytest.raises(ValueError, match=r"in \[0, 2\*\*32\)"):
            seed_for(bad[0], Stream.ROLLOUT, *bad[1:])


def test_member_heads_differ_and_do_not_depend_on_k():
    three, five = init_heads(16, 3, seed=4).weight, init_heads(16, 5, seed=4).weight
    assert torch.equal(three, five[:3])
    assert not torch.equal(three[0], three[1])
    assert not torch.equal(three, init_heads(16, 3, seed=5).weight)


@pytest.mark.parametrize("seed", [0, 1, 2, 7, 12345])
def test_python_random_draws_what_the_hand_made_generators_drew(seed):
    """The published numbers were drawn from random.Random(seed) (data subsets, label flips, prompt subsets,
    the synthetic pairs) and random.Random(f"{seed}\\x00{instruction}") (each pool's cut): python_random must
    draw the same sequences."""
    def draws(rng: random.Random) -> tuple:
        return rng.sample(range(1000), 20), rng.choice("abcdefgh"), rng.random(), rng.getrandbits(64)

    assert draws(python_random(seed)) == draws(random.Random(seed))
    for instruction in ["Write a haiku.", "Explain the café's menu\n in two lines", ""]:
        assert draws(python_random(seed, instruction)) == draws(random.Random(f"{seed}\x00{instruction}"))
    assert draws(python_random(seed, "a")) != draws(python_random(seed, "b")) != draws(python_random(seed))
