"""The scoring path of EnsembleReward: batched encoding gives the ids of one-at-a-time encoding, and
member scores equal each member's own forward, in fp32 and (approximately) under bf16 autocast."""

import pytest
import torch
from conftest import TINY

from rmens.data.encoding import PairEncoder
from rmens.models.config import EnsembleConfig
from rmens.models.ensemble import build_ensemble
from rmens.reward import EnsembleReward

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "And?"}]
PROMPTS = ["Name a fruit.", "Name a fruit.", "x " * 200, CONVERSATION]
RESPONSES = ["apple", "pear and plum " * 2000, "short", "Sure, more."]  # the second is cut before tokenising


def test_batched_encoding_matches_one_at_a_time(tiny_tokenizer):
    encoder = PairEncoder(tiny_tokenizer, 48, 16)
    assert encoder.encode_batch(PROMPTS, RESPONSES) == [encoder.encode(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert encoder.encode_batch([], []) == []
    with pytest.raises(ValueError, match="1 prompts but 0 responses"):
        encoder.encode_batch(["a"], [])


def test_a_huge_prompt_is_cut_before_it_is_tokenised(tiny_tokenizer):
    """A 10 MB prompt keeps the ids it would have (its last tokens, as `join` keeps them) while the tokenizer
    sees only a bounded tail of it: scoring it costs what a long prompt costs, not 5x the memory."""
    encoder = PairEncoder(tiny_tokenizer, max_length=32)
    seen = []
    tokenize = encoder._tokenize
    encoder._tokenize = lambda texts: seen.extend(len(t) for t in texts) or tokenize(texts)
    huge = "word " * 2_000_000 + "the question at the end"
    whole = encoder.join(PairEncoder(tiny_tokenizer, max_length=10**9).prompt_ids(huge[-20_000:]),
                         encoder.response_ids("q", "an answer"))
    assert encoder.encode(huge, "an answer") == whole == encoder.encode_batch([huge], ["an answer"])[0]
    assert max(seen) < 32 * encoder._max_token_chars + 1000  # the tail and the template, not 10 MB
    conversation = [{"role": "user", "content": huge}, {"role": "assistant", "content": "a"},
                    {"role": "user", "content": "and now?"}]
    assert encoder.encode(conversation, "b")[-4:] == encoder.encode_batch([conversation], ["b"])[0][-4:]


@pytest.mark.parametrize("kind", ["linear", "lora", "full"])
def test_member_scores_equal_each_members_own_forward(tiny_tokenizer, kind):
    from rmens.models.ensemble import to_lora

    cfg = EnsembleConfig(kind="linear" if kind == "lora" else kind, k=3, backbone=TINY, max_length=48)
    ensemble = build_ensemble(cfg)
    if kind == "lora":
        ensemble = to_lora(ensemble, EnsembleConfig(kind="lora", k=3, backbone=TINY, max_length=48))
    # Untrained, so no standardisation statistics: the raw scoring path is what is compared here.
    reward = EnsembleReward(ensemble.eval(), tiny_tokenizer, batch_size=2, allow_unstandardised=True)
    scores = reward.member_scores(PROMPTS, RESPONSES)
    with torch.no_grad():
        for j, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
            ids = torch.tensor([reward.encoder.encode(prompt, response)])
            for i in range(3):
                expected = ensemble.member_forward(i, ids, torch.ones_like(ids))
                torch.testing.assert_close(scores[i, j], expected[0], atol=1e-5, rtol=1e-4)
    bf16 = EnsembleReward(ensemble, tiny_tokenizer, batch_size=2, precision="bf16",
                          allow_unstandardised=True).member_scores(PROMPTS, RESPONSES)
    assert bf16.dtype == torch.float32 and torch.allclose(bf16, scores, atol=0.05, rtol=0.05)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # heads stay fp32 under autocast
        ids = torch.tensor([reward.encoder.encode(PROMPTS[0], RESPONSES[0])])
        assert ensemble(ids, torch.ones_like(ids)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16"):
        EnsembleReward(ensemble, tiny_tokenizer, precision="fp8")
