"""MT-Bench's released GPT-4 grades as Best-of-n pools: reading, agreement, exact Best-of-n, baselines."""

import gzip
import itertools
import json
import math
import random
from collections import Counter

import pytest
import torch
from ae_data import record, write_annotations
from conftest import real_data_dir, requires_real_data

from rmens.data.schema import DataError
from rmens.evaluation import mt_bench_grades as mb
from rmens.evaluation.pools import ScoreTable, alpaca_eval_win_rates, response_key


def grade(question_id, model, turn, score, answer_1="a1", answer_2="a2", category="writing"):
    """A released-format record; the questions depend only on the id, as in FastChat's files."""
    record = {"question_id": question_id, "model": model, "turn": turn, "score": score,
              "judge": ["gpt-4", "single-v1" if turn == 1 else "single-v1-multi-turn"], "category": category,
              "question_1": f"first question {question_id}", "answer_1": answer_1}
    if turn == 2:
        record.update(question_2=f"follow-up {question_id}", answer_2=answer_2)
    return record


def write(path, records):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def two_questions():
    return [
        grade(7, "zeta", 1, 9, answer_1="zeta's long first answer"),
        grade(7, "alpha", 1, 3, answer_1="alpha 1"),
        grade(7, "mid", 1, 8.5, answer_1="mid's answer"),
        grade(7, "zeta", 2, 2, answer_1="zeta's long first answer", answer_2="z2"),
        grade(7, "alpha", 2, 10, answer_1="alpha 1", answer_2="alpha's second"),
        grade(7, "mid", 2, -1, answer_1="mid's answer", answer_2="unparsed"),       # GPT-4 gave no grade
        grade(3, "alpha", 1, 5, answer_1="same"),
        grade(3, "beta", 1, 6, answer_1="same"),                                    # same text as alpha's
        grade(3, "alpha", 1, 5, answer_1="same"),                                   # an identical repeat
    ]


def test_pools_from_a_hand_made_file(tmp_path):
    stats = Counter()
    pools = mb.load_graded_pools(write(tmp_path / "grades.jsonl.gz", two_questions()), stats=stats)
    assert [p.key for p in pools] == [(3, 1), (7, 1), (7, 2)]                 # sorted by id, then turn
    assert stats == Counter(kept=7, failed_grade=1, duplicate=1)
    q7 = pools[1]
    assert q7.models == ("alpha", "mid", "zeta") and q7.grades == (3.0, 8.5, 9.0)
    assert q7.prompts == ("first question 7",) * 3 and q7.question == "first question 7"
    assert q7.lengths.tolist() == [7.0, 12.0, 24.0] and q7.grade_tensor.tolist() == [3.0, 8.5, 9.0]
    assert q7.category == "writing" and len(q7) == 3
    again = tmp_path / "pools.jsonl"
    mb.write_graded_pools(again, pools)
    assert mb.read_graded_pools(again) == pools                                # conversations round-trip


def test_second_turn_prompts_hold_each_systems_own_first_answer(tmp_path):
    pools = mb.load_graded_pools(write(tmp_path / "grades.jsonl", two_questions()))
    turn2 = pools[2]
    assert turn2.models == ("alpha", "zeta") and turn2.answers == ("alpha's second", "z2")
    assert turn2.question == "follow-up 7"
    for model, prompt in zip(turn2.models, turn2.prompts):
        first = {"alpha": "alpha 1", "zeta": "zeta's long first answer"}[model]
        assert prompt == [{"role": "user", "content": "first question 7"},
                          {"role": "assistant", "content": first},
                          {"role": "user", "content": "follow-up 7"}]
    items = mb.pool_items(pools)
    assert len(items) == 1 + 3 + 2                     # question 3's two systems gave the same text
    assert (turn2.prompts[1], "z2") in items
    table = ScoreTable([response_key(p, a) for p, a in items], torch.arange(12.0).reshape(2, 6).numpy())
    rewards = mb.pool_rewards(pools, table)
    assert [tuple(r.shape) for r in rewards] == [(2, 2), (2, 3), (2, 2)]
    assert rewards[0][0].tolist() == [0.0, 0.0]        # the shared (prompt, answer) is one column
    with pytest.raises(KeyError, match="question 7 turn 2 was never scored"):
        mb.pool_rewards(pools, ScoreTable([response_key(p, a) for p, a in items[:-1]],
                                          torch.zeros(1, 5).numpy()))


@pytest.mark.parametrize("change, message", [
    ({"score": "nine"}, r"grades.jsonl:2: field 'score' must be a finite number"),
    ({"score": None}, r"grades.jsonl:2: field 'score' must be a finite number"),
    ({"score": 11}, r"grades.jsonl:2: field 'score' must lie in \[1, 10\]"),
    ({"turn": 3}, r"grades.jsonl:2: field 'turn' must be 1 or 2"),
    ({"turn": "1"}, r"grades.jsonl:2: field 'turn' must be 1 or 2"),
    ({"model": ""}, r"grades.jsonl:2: field 'model' must be a non-empty string"),
    ({"question_id": True}, r"grades.jsonl:2: field 'question_id' must be an integer"),
    ({"category": "math"}, r"grades.jsonl:2: field 'category' differs from the other answers"),
    ({"model": "a", "score": 4}, r"grades.jsonl:2: field 'model': 'a' is graded again .* \(first at line 1\)"),
])
def test_a_malformed_record_names_file_line_and_field(tmp_path, change, message):
    records = [grade(1, "a", 1, 5), {**grade(1, "b", 1, 6), **change}]
    with pytest.raises(DataError, match=message):
        mb.load_graded_pools(write(tmp_path / "grades.jsonl", records))


@pytest.mark.parametrize("missing", ["question_id", "model", "turn", "score", "category", "question_1", "answer_1"])
def test_a_missing_field_is_named(tmp_path, missing):
    record = grade(1, "b", 1, 6)
    del record[missing]
    with pytest.raises(DataError, match=rf"grades.jsonl:2: missing field '{missing}'"):
        mb.load_graded_pools(write(tmp_path / "grades.jsonl", [grade(1, "a", 1, 5), record]))


def test_second_turn_fields_are_required_and_bad_json_is_located(tmp_path):
    record = grade(1, "a", 2, 5)
    del record["answer_2"]
    with pytest.raises(DataError, match=r"grades.jsonl:1: missing field 'answer_2'"):
        mb.load_graded_pools(write(tmp_path / "grades.jsonl", [record]))
    (tmp_path / "bad.jsonl").write_text(json.dumps(grade(1, "a", 1, 5)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        mb.load_graded_pools(tmp_path / "bad.jsonl")


def test_small_pools_and_selected_questions(tmp_path):
    path = write(tmp_path / "grades.jsonl", two_questions())
    stats = Counter()
    pools = mb.load_graded_pools(path, min_size=3, stats=stats)
    assert [p.key for p in pools] == [(7, 1)] and stats["pools_too_small"] == 2
    assert [p.key for p in mb.load_graded_pools(path, questions={3})] == [(3, 1)]
    with pytest.raises(DataError, match="no pools left after filtering"):
        mb.load_graded_pools(path, questions={99})


def test_max_questions_is_stable_when_questions_are_added(tmp_path):
    def records(ids):
        return [grade(q, m, t, s) for q in ids for t in (1, 2) for m, s in (("a", 3), ("b", 7))]

    old_ids, new_ids = list(range(1, 21)), list(range(1, 41))
    shuffled = records(old_ids)
    random.Random(0).shuffle(shuffled)
    old = {p.question_id for p in mb.load_graded_pools(write(tmp_path / "old.jsonl", records(old_ids)),
                                                       max_questions=5)}
    assert len(old) == 5
    assert {p.question_id for p in mb.load_graded_pools(write(tmp_path / "shuffled.jsonl", shuffled),
                                                        max_questions=5)} == old   # file order is irrelevant
    new = {p.question_id for p in mb.load_graded_pools(write(tmp_path / "new.jsonl", records(new_ids)),
                                                       max_questions=5)}
    assert new & set(old_ids) <= old              # an old question is only ever displaced by a new one
    assert mb.select_questions(new_ids, 40) == set(new_ids)
    assert mb.select_questions(old_ids, 5, seed=1) != old    # the seed does move the choice


def pool(grades, answers=None, question_id=1):
    answers = answers or [f"answer {i}" for i in range(len(grades))]
    return mb.GradedPool(question_id, 1, "writing", "q", ("q",) * len(grades),
                         tuple(f"m{i}" for i in range(len(grades))), tuple(answers), tuple(map(float, grades)))


def brute_force(rewards, values, n):
    """Mean over every n-subset of the value of its best answer, tied maxima chosen uniformly."""
    subsets = list(itertools.combinations(range(len(rewards)), n))
    total = 0.0
    for subset in subsets:
        top = max(rewards[i] for i in subset)
        tied = [i for i in subset if rewards[i] == top]
        total += sum(values[i] for i in tied) / len(tied)
    return total / len(subsets)


def test_bon_rows_match_enumeration_of_subsets_with_tied_rewards():
    pools = [pool([3, 9, 5, 1, 7, 8], answers=["a" * k for k in (5, 1, 9, 2, 4, 4)]), pool([2, 6, 10, 4, 1])]
    rewards = [torch.tensor([1.0, 2.0, 2.0, 0.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 3.0, 1.0, 1.0])]
    rows = mb.bon_rows(pools, rewards, ns=[1, 2, 3, 5, 8], with_values=True)
    assert [r["n"] for r in rows] == [1, 2, 3, 5]                            # 8 is capped at the pool of 5
    for row in rows:
        expected = [brute_force(r.tolist(), list(p.grades), row["n"]) for p, r in zip(pools, rewards)]
        assert row["values"] == pytest.approx(expected)
        assert row["mean_grade"] == pytest.approx(sum(expected) / 2)
        assert row["se"] == pytest.approx(abs(expected[0] - expected[1]) / 2)   # sd of two / sqrt(2)
        lengths = brute_force(rewards[0].tolist(), pools[0].lengths.tolist(), row["n"])
        assert row["mean_length"] == pytest.approx((lengths + brute_force(rewards[1].tolist(),
                                                     pools[1].lengths.tolist(), row["n"])) / 2)
    assert rows[0]["kl_bon"] == pytest.approx(0.0)


def test_bon_rows_kl_random_and_oracle():
    grades = [4, 9, 1, 7, 7]
    pools = [pool(grades)]
    distinct = mb.bon_rows(pools, [torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])], ns=[5])
    assert distinct[0]["kl_bon"] == pytest.approx(math.log(5))               # the pick is certain
    assert distinct[0]["mean_grade"] == 4.0                                  # the top reward's grade
    baselines = mb.baseline_rewards(pools)
    for row in mb.bon_rows(pools, baselines["random"], ns=[1, 2, 3, 4, 5]):
        assert row["mean_grade"] == pytest.approx(sum(grades) / 5) and row["kl_bon"] == pytest.approx(0.0)
    best = mb.bon_rows(pools, baselines["best"], ns=[1, 5])
    assert best[0]["mean_grade"] == pytest.approx(5.6) and best[1]["mean_grade"] == 9.0
    with pytest.raises(ValueError, match="aggregate the members first"):
        mb.bon_rows(pools, [torch.zeros(2, 5)])
    with pytest.raises(ValueError, match="has 5 answers but rewards of shape"):
        mb.bon_rows(pools, [torch.zeros(4)])
    assert mb.capped_ns([pool([1] * 17)]) == [1, 2, 4, 8, 16]


def test_grade_pairs_and_agreement():
    pools = [pool([5, 5, 9], answers=["long answer", "mid", "s"]), pool([2, 2]), pool([1, 3])]
    assert mb.grade_pairs(pools) == [(0, 2, 0), (0, 2, 1), (2, 1, 0)]        # equal grades are skipped
    grades = [p.grade_tensor for p in pools]
    same = mb.agreement(pools, grades)
    assert same["accuracy"] == 1.0 and same["n_pairs"] == 3
    assert same["pool_indices"] == [0, 2] and same["per_pool"] == [1.0, 1.0]
    assert same["n_longer_lost"] == 2 and same["accuracy_longer_lost"] == 1.0
    assert same["length_rule_accuracy"] == pytest.approx(1 / 6)   # shorter won twice; equal lengths: one half
    assert mb.agreement(pools, [-g for g in grades])["accuracy"] == 0.0
    assert mb.agreement(pools, [torch.zeros(len(p)) for p in pools])["accuracy"] == 0.5   # ties: one half
    members = [torch.stack([g, -g, g]) for g in grades]                      # [k=3, m]: the mean is g / 3
    both = mb.agreement(pools, members)
    assert both["accuracy"] == 1.0 and both["member_accuracy"] == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="no two answers with different grades"):
        mb.agreement([pools[1]], [grades[1]])


def test_system_prior_is_the_mean_z_score_over_judge_sets():
    win_rates = {"ae1": {"gpt4": 0.9, "gpt4_0314": 0.7, "claude": 0.5, "other": 0.3, "weak": 0.1},
                 "ae2": {"claude": 0.3, "vicuna-33b-v1.3": 0.1},
                 "ae3": {"x": 1.0}}                   # no mapped generator: never standardised
    # ae1: mean 0.5, population sd sqrt(0.08); ae2: mean 0.2, sd 0.1
    sd = math.sqrt(0.08)
    prior = mb.system_prior_from_alpaca_eval(win_rates, ["gpt-4", "claude-v1", "vicuna-33b-v1.3", "koala-13b"])
    assert prior == pytest.approx({"gpt-4": (0.4 / sd + 0.2 / sd) / 2, "claude-v1": (0.0 + 1.0) / 2,
                                   "vicuna-33b-v1.3": -1.0})
    assert set(mb.alpaca_eval_matches(win_rates, ["gpt-4", "koala-13b"])) == {"gpt-4"}
    with pytest.raises(ValueError, match="at least two finite win rates"):
        mb.system_prior_from_alpaca_eval({"ae2": {"claude": 0.3}}, ["claude-v1"])
    for model, generators in mb.MT_BENCH_TO_ALPACA_EVAL.items():
        assert generators and all(isinstance(g, str) for g in generators), model


def test_win_rates_are_kept_apart_by_reference_system(tmp_path):
    ae1 = [record("q1", "r", "o1", "gpt4", 2, ref_generator="davinci"),
           record("q2", "r", "o2", "gpt4", 0, ref_generator="davinci"),           # AE1 draw: 0.5
           record("q1", "r", "o3", "claude", 1, ref_generator="davinci"),
           record("q1", "r", "r", "copycat", 2, ref_generator="davinci"),         # identical to the reference
           record("q1", "r", "o4", "example", 2, ref_generator="davinci"),        # gamed generator
           record("q1", "r", "o5", "claude", 2, ref_generator="gpt4_0613")]       # another reference
    write_annotations(tmp_path / "ae1_gpt4_pairs.train.jsonl.gz", ae1)
    write_annotations(tmp_path / "ae1_gpt4_pairs.test.jsonl.gz", [record("q9", "r", "o", "gpt4", 1)])
    rates = alpaca_eval_win_rates(tmp_path, judges=["ae1"], min_generators=1)
    assert rates == {"ae1/davinci": {"gpt4": 0.75, "claude": 0.0}, "ae1/gpt4_0613": {"claude": 1.0}}
    assert list(alpaca_eval_win_rates(tmp_path, judges=["ae1"], min_generators=2)) == ["ae1/davinci"]
    with pytest.raises(FileNotFoundError, match="no ae2 annotation files of split 'train'"):
        alpaca_eval_win_rates(tmp_path)


def test_unmatched_systems_tie_in_the_system_prior_baseline():
    p = pool([3, 4, 5, 6])                             # systems m0..m3
    rewards = mb.baseline_rewards([p], {"m0": 2.0, "m2": -1.0})["system_prior"][0]
    assert rewards.tolist() == [2.0, 0.5, -1.0, 0.5]   # m1 and m3 get the mean of the known priors
    assert mb.baseline_rewards([p], {})["system_prior"][0].tolist() == [0.0] * 4
    base = mb.baseline_rewards([p])
    assert set(base) == {"random", "longest", "shortest", "best"}


@pytest.mark.realdata
@requires_real_data
def test_released_grades():
    path = real_data_dir() / "mt_bench" / "gpt4_single_grades.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} is not in RMENS_DATA_DIR")
    stats = Counter()
    pools = mb.load_graded_pools(path, stats=stats)
    assert len(pools) == 80 and all(len(p) == 18 for p in pools)
    assert stats["kept"] == 1440 and stats["duplicate"] == 0
    models = sorted({m for p in pools for m in p.models})
    if not (real_data_dir() / "alpaca_eval").is_dir():
        pytest.skip("RMENS_DATA_DIR has no alpaca_eval folder")
    rates = alpaca_eval_win_rates(real_data_dir() / "alpaca_eval")
    prior = mb.system_prior_from_alpaca_eval(rates, models)
    assert 0 < len(prior) < len(models)                       # 5 of 18 (vicuna-33b-v1.3 meets only gpt4_0613)
    base = mb.baseline_rewards(pools, prior)
    at16 = {name: mb.bon_rows(pools, rewards, ns=[16])[0] for name, rewards in base.items()}
    assert at16["best"]["mean_grade"] > at16["random"]["mean_grade"] + 2
    assert at16["best"]["kl_bon"] > at16["random"]["kl_bon"] == pytest.approx(0.0)
    assert at16["random"]["mean_grade"] == pytest.approx(sum(sum(p.grades) for p in pools) / 1440)
