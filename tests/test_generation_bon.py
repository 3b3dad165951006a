import functools
import itertools
import json
import math

import pytest
import torch
from conftest import TINY

from rmens import bon, generation
from rmens.bon import bon_curve, bon_ns, draw_samples, expected_best_of_n, kl_bon, load_score_matrix, score_samples
from rmens.bon_config import BonConfig
from rmens.config import derive
from rmens.data.schema import DataError
from rmens.generation import generate
from rmens.generation_config import GenerationConfig
from rmens.models.aggregate import aggregate
from rmens.models.backbone import load_policy
from rmens.models.config import AggregationConfig, EnsembleConfig
from rmens.models.ensemble import build_ensemble
from rmens.reward import CallableReward, EnsembleReward, RewardError

PROMPTS = ["Name a fruit.", "Which fruit is red?", "Say hello."]


@pytest.fixture(scope="module")
def policy(tiny_path):
    return load_policy(tiny_path)


def test_generation_is_seeded_bounded_and_stops_at_eos(policy, tiny_tokenizer):
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, batch_size=2, seed=3)
    a = generate(policy, tiny_tokenizer, PROMPTS, cfg)
    b = generate(policy, tiny_tokenizer, PROMPTS, cfg)
    c = generate(policy, tiny_tokenizer, PROMPTS, derive(cfg, seed=4))
    assert a.texts == b.texts and a.response_ids == b.response_ids
    assert a.response_ids != c.response_ids
    eos = tiny_tokenizer.eos_token_id
    for ids, finished in zip(a.response_ids, a.finished):
        assert 1 <= len(ids) <= 12
        assert finished == (ids[-1] == eos) and eos not in ids[:-1]
    # batch size changes nothing but speed when each batch is seeded the same way
    assert len(generate(policy, tiny_tokenizer, PROMPTS, derive(cfg, batch_size=3)).texts) == 3


def test_generation_bad_prompts(policy, tiny_tokenizer):
    cfg = GenerationConfig(max_new_tokens=4)
    with pytest.raises(DataError, match="empty"):
        generate(policy, tiny_tokenizer, [], cfg)
    with pytest.raises(DataError, match="prompt 1 is empty"):
        generate(policy, tiny_tokenizer, ["ok", "  "], cfg)
    with pytest.raises(DataError, match="prompt 0 has .* exceeds the policy's context of 512"):
        generate(policy, tiny_tokenizer, ["word " * 600], cfg)


def brute_force(proxy, target, n):
    """Average over every n-subset of the target score of the subset's proxy-argmax."""
    out = []
    for p_row, t_row in zip(proxy.tolist(), target.tolist()):
        picks = [t_row[max(subset, key=lambda i: p_row[i])] for subset in itertools.combinations(range(len(p_row)), n)]
        out.append(sum(picks) / len(picks))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n_samples", [1, 4, 6])
def test_unbiased_estimator_equals_brute_force(n_samples):
    gen = torch.Generator().manual_seed(n_samples)
    proxy, target = torch.randn(3, n_samples, generator=gen), torch.randn(3, n_samples, generator=gen)
    for n in range(1, n_samples + 1):
        torch.testing.assert_close(expected_best_of_n(proxy, target, n), brute_force(proxy, target, n))


def test_bon_curve_and_kl():
    assert kl_bon(1) == 0.0 and kl_bon(4) == pytest.approx(math.log(4) - 0.75)
    assert bon_ns(16) == [1, 2, 4, 8, 16] and bon_ns(6) == [1, 2, 4, 6]
    proxy = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    rows = bon_curve(proxy, {"gold": -proxy})
    assert [r["n"] for r in rows] == [1, 2, 4]
    assert rows[0]["proxy"] == pytest.approx(1.5) and rows[-1]["proxy"] == 3.0 and rows[-1]["gold"] == -3.0
    assert rows[1]["proxy"] > rows[0]["proxy"]


def test_ensemble_reward_scores_members_in_one_call(tiny_tokenizer):
    ensemble = build_ensemble(EnsembleConfig(kind="linear", k=3, backbone=TINY)).eval()
    calls = []
    ensemble.backbone.register_forward_hook(lambda *a: calls.append(1))
    reward = EnsembleReward(ensemble, tiny_tokenizer, AggregationConfig(rule="lcb", beta=1.0), batch_size=8,
                            allow_unstandardised=True)  # untrained: no standardisation statistics
    out = reward(PROMPTS, ["apple", "cherry", "hello"])
    assert out.members.shape == (3, 3) and len(calls) == 1
    torch.testing.assert_close(out.scores, aggregate(out.members, "lcb", beta=1.0))


def test_callable_reward_rejects_nan():
    with pytest.raises(RewardError, match=r"non-finite reward for example\(s\) \[1\]"):
        CallableReward(lambda p, r: float("nan") if r == "b" else 1.0)(["x", "y"], ["a", "b"])


def test_samples_are_stored_once_and_rescored_without_regenerating(policy, tiny_tokenizer, tmp_path, monkeypatch):
    cfg = BonConfig(n_samples=4, generation=GenerationConfig(max_new_tokens=6, batch_size=8))
    rows = draw_samples(functools.partial(generate, policy, tiny_tokenizer), PROMPTS, cfg, tmp_path, progress=False)
    assert len(rows) == 12 and {r["sample_id"] for r in rows} == {0, 1, 2, 3}
    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("rescoring must not generate"))
    length = CallableReward(lambda p, r: len(r))
    ensemble = build_ensemble(EnsembleConfig(kind="linear", k=2, backbone=TINY)).eval()
    ens = EnsembleReward(ensemble, tiny_tokenizer, allow_unstandardised=True)  # untrained: no statistics
    score_samples(tmp_path, {"length": length, "ens": ens})
    lengths = load_score_matrix(tmp_path, "length")
    assert lengths.shape == (3, 4)
    assert load_score_matrix(tmp_path, "ens", member=1).shape == (3, 4)
    stored = [json.loads(line) for line in (tmp_path / "scores" / "ens.jsonl").open()]
    assert len(stored[0]["members"]) == 2
    # stored scores are reused: a scorer that would fail is never called again for 'length'
    score_samples(tmp_path, {"length": CallableReward(lambda p, r: float("nan"))})
    picked = bon.select_best(tmp_path, "length", 4)
    assert [p["proxy_score"] for p in picked] == lengths.max(dim=1).values.tolist()
    assert bon.write_selection(tmp_path, "length", 2).is_file()


def test_prompts_that_fit_leave_room_for_the_answer():
    from rmens.generation import prompts_that_fit

    kept, dropped = prompts_that_fit(TINY, ["Name a fruit.", "word " * 600, "Say hello."], max_new_tokens=8)
    assert kept == ["Name a fruit.", "Say hello."] and dropped == 1


def test_non_finite_scores_are_rejected_where_they_enter_best_of_n(tmp_path, policy, tiny_tokenizer):
    nan = float("nan")
    with pytest.raises(ValueError, match="non-finite proxy score for prompt 0, sample 1"):
        bon_curve(torch.tensor([[0.0, nan, 1.0]]), {})
    with pytest.raises(ValueError, match="non-finite target score for prompt 0, sample 2"):
        bon_curve(torch.tensor([[0.0, 1.0, 2.0]]), {"gold": torch.tensor([[0.0, 1.0, nan]])})
    draw_samples(functools.partial(generate, policy, tiny_tokenizer), PROMPTS[:1],
                 BonConfig(n_samples=2, generation=GenerationConfig(max_new_tokens=4)), tmp_path, progress=False)
    with pytest.raises(ValueError, match="non-finite proxy score for prompt 0, sample 1"):
        bon.select_best(tmp_path, "any", 2, scores=torch.tensor([[0.0, nan]]))
