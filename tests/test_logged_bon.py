"""Best-of-n over logged outputs: the exact estimator, pools from annotation files, scoring once."""

import itertools
import math
from collections import Counter

import pytest
import torch
from ae_data import record, write_annotations

from rmens.bon import selection_probabilities
from rmens.data.schema import DataError
from rmens.evaluation import logged_bon as lb
from rmens.evaluation import pools as pl


def brute_force_pick(rewards: list[float], values: list[float], n: int) -> float:
    """Average over every n-subset of the value of its best output, tied maxima picked uniformly."""
    total, subsets = 0.0, list(itertools.combinations(range(len(rewards)), n))
    for subset in subsets:
        best = max(rewards[i] for i in subset)
        tied = [i for i in subset if rewards[i] == best]
        total += sum(values[i] for i in tied) / len(tied)
    return total / len(subsets)


@pytest.mark.parametrize("m", [1, 3, 5, 7])
def test_selection_probabilities_match_enumeration_of_subsets_with_ties(m):
    gen = torch.Generator().manual_seed(m)
    for _ in range(5):
        rewards = torch.randint(0, 3, (m,), generator=gen).double()  # many ties on purpose
        values = torch.rand(m, generator=gen, dtype=torch.float64)
        for n in range(1, m + 1):
            probs = selection_probabilities(rewards, n)
            assert float(probs.sum()) == pytest.approx(1.0)
            assert float(probs @ values) == pytest.approx(brute_force_pick(rewards.tolist(), values.tolist(), n))


def test_constant_reward_is_random_selection_and_bad_input_fails():
    assert selection_probabilities(torch.zeros(4), 3).tolist() == [0.25] * 4
    with pytest.raises(ValueError, match="n must be in"):
        selection_probabilities(torch.zeros(4), 5)
    with pytest.raises(ValueError, match="non-finite proxy score at sample"):
        selection_probabilities(torch.tensor([0.0, float("nan")]), 1)


def test_pools_from_a_hand_made_file(tmp_path):
    rows = [
        record("q1", "ref1", "short", "b-model", 2),
        record("q1", "ref1", "a much longer answer", "a-model", 1),
        record("q1", "ref1", "draw answer", "c-model", 0),                    # AE1 draw -> 0.5
        record("q1", "ref1", "ref1", "ref", 1.5),                             # the reference against itself
        record("q1", "ref1", "constant nonsense", "example", 2),              # gamed generator
        record("q1", "ref1", "again", "a-model", 2),                          # repeated generator
        record("q2", "ref2", "soft", "a-model", 1.75),                        # AE2-style probability
        record("q2", "ref2-other", "other ref", "b-model", 1.25),
    ]
    write_annotations(tmp_path / "ae1_gpt4_pairs.test.jsonl.gz", rows)
    write_annotations(tmp_path / "ae2_gpt4turbo_pairs.test.jsonl", [record("q3", "r", "o", "g", 2)])
    write_annotations(tmp_path / "unrelated.jsonl", [{"not": "an annotation"}])
    stats = Counter()
    pools = {p.instruction: p for p in pl.load_pools(tmp_path, "ae1", stats=stats)}
    assert set(pools) == {"q1", "q2"}
    q1 = pools["q1"]
    assert q1.generators == ("a-model", "b-model", "c-model")  # sorted; the first a-model record is kept
    assert q1.outputs == ("a much longer answer", "short", "draw answer")
    assert q1.wins == (0.0, 1.0, 0.5) and q1.references == ("ref1",) * 3
    assert q1.lengths.tolist() == [20.0, 5.0, 11.0]
    assert pools["q2"].wins == (0.75, 0.25) and pools["q2"].references == ("ref2", "ref2-other")
    assert stats == Counter(kept=5, reference=1, filtered_generator=1, duplicate=1)
    assert [p.instruction for p in pl.load_pools(tmp_path, "ae2")] == ["q3"]  # plain .jsonl works too
    only_b = pl.load_pools(tmp_path, "ae1", include_generators=["b-model"])
    assert [p.generators for p in only_b] == [("b-model",), ("b-model",)]
    again = tmp_path / "pools.jsonl"
    pl.write_pools(again, list(pools.values()))
    assert pl.read_pools(again) == list(pools.values())


@pytest.mark.parametrize("change, message", [
    ({"output_2": None}, "pairs.jsonl:1: field 'output_2' must be a string"),
    ({"preference": "2"}, "pairs.jsonl:1: field 'preference' must be a number"),
    ({"preference": 2.5}, "pairs.jsonl:1: field 'preference' 2.5 is outside the allowed values"),
    ({"instruction": ""}, "pairs.jsonl:1: field 'instruction' must be a non-empty string"),
])
def test_a_malformed_annotation_names_file_line_and_field(tmp_path, change, message):
    write_annotations(tmp_path / "ae1_gpt4_pairs.jsonl", [{**record("q", "r", "o", "g", 2), **change}])
    with pytest.raises(DataError, match=message):
        pl.load_pools(tmp_path, "ae1")


def test_missing_files_and_empty_pools_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ae2_gpt4turbo_pairs"):
        pl.load_pools(tmp_path, "ae2")
    write_annotations(tmp_path / "ae1_gpt4_pairs.jsonl", [record("q", "r", "o", "example", 2)])
    with pytest.raises(DataError, match="no outputs left after filtering"):
        pl.load_pools(tmp_path, "ae1")


def _pool(instruction, outputs, wins):
    return pl.Pool(instruction, None, tuple(f"g{i}" for i in range(len(outputs))), tuple(outputs), tuple(wins),
                   ("reference",) * len(outputs))


def test_curve_baselines_and_standard_error():
    pools = [_pool("a", ["x", "xxx", "xx"], [1.0, 0.0, 0.5]), _pool("b", ["yy", "y", "yyyy"], [0.0, 1.0, 1.0])]
    curves = {name: lb.curve(pools, rewards, [1, 2, 3]) for name, rewards in lb.baseline_rewards(pools).items()}
    assert [r["n"] for r in curves["random"]] == [1, 2, 3]
    assert all(r["win_rate"] == pytest.approx((0.5 + 2 / 3) / 2) for r in curves["random"])  # at every n
    assert curves["best"][-1]["win_rate"] == 1.0
    assert curves["longest"][-1]["win_rate"] == pytest.approx(0.5) and curves["longest"][-1]["mean_length"] == 3.5
    assert curves["shortest"][-1]["mean_length"] == 1.0
    # the exact KL of the pick from the pool's uniform distribution: 0 for a random pick; for distinct rewards at
    # n = 2 of m = 3 the ranks are picked with probability 0, 1/3, 2/3
    assert curves["random"][1]["kl_bon"] == pytest.approx(0.0, abs=1e-12)
    assert curves["longest"][1]["kl_bon"] == pytest.approx(math.log(3) + (math.log(1 / 3) + 2 * math.log(2 / 3)) / 3)
    best_n2 = [1.0 * 2 / 3 + 0.5 * 1 / 3, 1.0]  # per instruction, by enumeration of the 3 pairs
    assert curves["best"][1]["win_rate"] == pytest.approx(sum(best_n2) / 2)
    assert curves["best"][1]["se"] == pytest.approx(abs(best_n2[0] - best_n2[1]) / 2)


def test_random_baseline_is_the_pool_average():
    pools = [_pool("a", ["x", "xx", "xxx", "xxxx"], [1.0, 0.0, 0.5, 1.0])]
    rows = lb.curve(pools, lb.baseline_rewards(pools)["random"], lb.bon_ns(4))
    assert [r["win_rate"] for r in rows] == pytest.approx([0.625] * 3)


def test_responses_are_scored_once_and_the_table_resumes(tmp_path):
    pools = [_pool("a", ["x", "yy"], [1.0, 0.0]), _pool("b", ["x", "zzz"], [0.0, 1.0])]
    calls = []

    def members(prompts, responses):
        calls.append(len(responses))
        return torch.tensor([[float(len(r)) for r in responses], [-float(len(r)) for r in responses]])

    items = pl.pool_items(pools)
    assert len(items) == 6  # ("a", "x") and ("b", "x") differ by prompt, as do the two references
    path = tmp_path / "scores.npz"
    table = pl.score_items(members, items[:3], path)
    table = pl.score_items(members, items, path, chunk=2)
    assert calls == [3, 2, 1] and table.k == 2
    assert pl.score_items(lambda *a: pytest.fail("everything is scored"), items, path).members.shape == (2, 6)
    torch.testing.assert_close(table.lookup("b", ["zzz", "x"]), torch.tensor([[3.0, 1.0], [-3.0, -1.0]],
                                                                            dtype=torch.float64))
    with pytest.raises(KeyError, match="never scored"):
        table.lookup("b", ["unknown"])
    margins, len_winner, len_loser, pool_of = lb.verdict_margins(pools, table)
    # pool a: "x" (1 char) beat the reference (9); "yy" lost to it; pool b: "x" lost, "zzz" won
    assert margins[0].tolist() == [1 - 9, 9 - 2, 9 - 1, 3 - 9] and len_winner.tolist() == [1, 9, 9, 3]
    assert pool_of.tolist() == [0, 0, 1, 1]
    standardised = table.standardised_by([1.0, -1.0], [2.0, 4.0])
    torch.testing.assert_close(standardised.lookup("b", ["zzz"], standardised=True),
                               torch.tensor([[1.0], [-0.5]], dtype=torch.float64))
    standardised.save(tmp_path / "std.npz")
    assert pl.ScoreTable.load(tmp_path / "std.npz").lookup("b", ["zzz"], standardised=True).tolist() == [[1.0], [-0.5]]
    with pytest.raises(ValueError, match="holds no member standardisation"):
        table.lookup("b", ["zzz"], standardised=True)
    with pytest.raises(ValueError, match="non-finite reward"):
        pl.score_items(lambda p, r: torch.full((1, len(r)), float("nan")), items, tmp_path / "nan.npz")
    assert not (tmp_path / "nan.npz").exists()


def test_subsampling_is_seeded_and_drops_small_pools():
    pools = [_pool(f"q{i}", [f"o{j}" for j in range(3 + i)], [0.5] * (3 + i)) for i in range(5)]
    stats = Counter()
    picked = pl.subsample_pools(pools, max_instructions=2, pool_size=4, min_size=4, seed=0, stats=stats)
    assert len(picked) == 2 and all(len(p) == 4 for p in picked) and stats["pools_too_small"] == 1
    assert picked == pl.subsample_pools(pools, max_instructions=2, pool_size=4, min_size=4, seed=0)
    assert pl.subsample_pools(pools, max_instructions=None, pool_size=None, min_size=1) == pools


def test_logged_bon_files(tmp_path):
    pools = [_pool("a", ["x", "xx"], [1.0, 0.0])]
    rows = lb.curve(pools, lb.baseline_rewards(pools)["longest"], [1, 2])
    entry = {"judge_name": "test", "metric": "win_rate", "ns": [1, 2], "baselines": {"longest": rows},
             "gold": {"gold/mean": rows}, "arms": {"arm/mean": rows, "arm/min": rows}, "twins": {"arm/mean": rows},
             "rules": {"arm": ["mean", "min"]}}
    graded = [{**row, "mean_grade": 5.0 + row.pop("win_rate")} for row in [dict(r) for r in rows]]
    mt_bench = {"judge_name": "grades", "metric": "mean_grade", "ns": [1, 2], "baselines": {"random": graded}}
    files = lb.save_logged_bon({"judges": {"ae1": entry}, "mt_bench": mt_bench}, tmp_path)
    assert files["png_ae1"].stat().st_size > 1000 and files["png_mt_bench"].is_file()
    lines = files["csv"].read_text().splitlines()
    assert lines[0] == "set,group,series,n,kl_bon,value,se,mean_length" and len(lines) == 1 + 10 + 2
    assert lines[1].startswith("ae1,baselines,longest,1,") and lines[-1].startswith("mt_bench,baselines,random,2,")


def test_kl_of_a_logged_pick_is_exact_and_exceeds_the_independent_draws_formula():
    """Picking among n of m logged outputs without replacement: KL(pick || uniform) by enumerating subsets."""
    from rmens.bon import kl_bon, kl_from_uniform

    rewards = torch.tensor([0.3, 1.0, 1.0, -2.0, 0.5])  # a tie
    for n in range(1, 6):
        counts = torch.zeros(5, dtype=torch.float64)
        for subset in itertools.combinations(range(5), n):
            best = max(rewards[i] for i in subset)
            tied = [i for i in subset if rewards[i] == best]
            for i in tied:
                counts[i] += 1 / len(tied)
        probs = counts / counts.sum()
        expected = sum(float(p * math.log(p * 5)) for p in probs if p > 0)
        assert kl_from_uniform(selection_probabilities(rewards, n)) == pytest.approx(expected)
    top = selection_probabilities(torch.arange(16.0), 16)
    assert kl_from_uniform(top) == pytest.approx(math.log(16)) and kl_bon(16) == pytest.approx(1.835, abs=1e-3)
