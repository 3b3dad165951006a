"""A local LLM judge whose outputs sometimes hold no [[rating]] or verdict: the unparsed items are counted,
recorded and left out, and judging fails only past gold.max_unparsed_fraction."""

import json
import logging
import math

import pytest
import torch
from pydantic import ValidationError

from rmens.evaluation import alpaca_eval as ae
from rmens.evaluation.judges import JudgeParseError, LocalLLMJudge
from rmens.evaluation.mt_bench import grade, summarize
from rmens.pipeline.config import GoldConfig

PROMPTS = {
    "single-v1": {"system_prompt": "judge", "prompt_template": "Q={question} A={answer}"},
    "single-v1-multi-turn": {"system_prompt": "judge",
                             "prompt_template": "Q={question_1}|{answer_1}|{question_2}|{answer_2}"},
    "pair-v2": {"system_prompt": "judge", "prompt_template": "Q={question} A:{answer_a} B:{answer_b}"},
}
GARBLED = "The first answer is fine, the second is fine too; I will not pick."
N = 20


def stub_generate(bad_questions: set[str]):
    """A fake judge model: no verdict or rating for questions in `bad_questions`; otherwise the model's
    answer ('out...') always wins a pair and every answer gets a 7."""

    def generate(conversations):
        texts = []
        for conversation in conversations:
            prompt = conversation[-1]["content"]
            question = prompt[2:].split(" ", 1)[0].split("|", 1)[0]
            if question in bad_questions:
                texts.append(GARBLED)
            elif "A:" in prompt:
                texts.append("[[A]]" if "A:out" in prompt else "[[B]]")
            else:
                texts.append("Rating: [[7]]")
        return texts

    return generate


def eval_set():
    return [f"q{i}" for i in range(N)], [f"out{i}" for i in range(N)], [f"ref{i}" for i in range(N)]


@pytest.mark.reliability
def test_win_rate_below_the_limit_reports_unparsed_and_leaves_them_out(tmp_path, caplog):
    instructions, outputs, references = eval_set()
    judge = LocalLLMJudge(PROMPTS, generate_fn=stub_generate({"q3"}), max_unparsed_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="rmens.evaluation.judges"):
        result = ae.win_rate(judge, instructions, outputs, references, output_dir=tmp_path)
    assert result["unparsed"] == 1 and result["unparsed_fraction"] == pytest.approx(1 / N)
    assert result["failed_annotations"] == 1
    assert result["win_rate"] == pytest.approx(100.0)  # 19 real verdicts, all for the model; no tie made up
    assert "1 of 20" in caplog.text and "judge.max_unparsed_fraction=0.1" in caplog.text
    [record] = judge.unparsed
    assert record["index"] == 3 and record["instruction"] == "q3" and record["raw_output"] == GARBLED
    assert record["part"] == "alpaca_eval" and record["failed_orders"] == ["as given", "swapped"]
    saved = json.loads((tmp_path / "win_rate.json").read_text())
    assert saved["unparsed"] == 1


@pytest.mark.reliability
def test_win_rate_above_the_limit_raises_one_clear_error():
    instructions, outputs, references = eval_set()
    judge = LocalLLMJudge(PROMPTS, generate_fn=stub_generate({"q1", "q5", "q9"}), max_unparsed_fraction=0.1)
    with pytest.raises(JudgeParseError, match=r"judge\.max_unparsed_fraction") as caught:
        ae.win_rate(judge, instructions, outputs, references)
    message = str(caught.value)
    assert "3 of 20" in message and "0.1" in message and GARBLED[:30] in message
    assert len(judge.unparsed) == 3  # still recorded, for the stage to write out


@pytest.mark.reliability
def test_one_unparsed_order_of_a_swapped_pair_drops_the_pair():
    def generate(conversations):  # the swapped order never parses for q0
        return ["nothing" if c[-1]["content"].startswith("Q=q0 A:out") else "[[B]]" for c in conversations]

    judge = LocalLLMJudge(PROMPTS, generate_fn=generate)
    p_b = judge.compare(["q0", "q1"], ["ref0", "ref1"], ["out0", "out1"])
    assert math.isnan(p_b[0]) and p_b[1] == 0.5
    assert judge.unparsed[0]["failed_orders"] == ["swapped"] and judge.unparsed[0]["raw_output"] == "nothing"


def mt_bench_set(n: int):
    questions = [{"question_id": i, "category": "writing", "turns": [f"q{i}", f"second{i}"]} for i in range(n)]
    answers = [{"question_id": i, "category": "writing", "turns": [f"a{i}", f"b{i}"]} for i in range(n)]
    return questions, answers


@pytest.mark.reliability
def test_mt_bench_grades_below_the_limit_count_unparsed():
    questions, answers = mt_bench_set(10)
    judge = LocalLLMJudge(PROMPTS, generate_fn=stub_generate({"q4"}), max_unparsed_fraction=0.1)
    grades = grade(judge, questions, answers)  # q4 fails in both turns: 2 of 20 grades
    summary = summarize(grades)
    assert summary["unparsed"] == 2 and summary["unparsed_fraction"] == pytest.approx(0.1)
    assert summary["score"] == pytest.approx(7.0)  # the unparsed grades are left out, not averaged in
    assert sorted((r["question_id"], r["turn"]) for r in judge.unparsed) == [(4, 1), (4, 2)]
    assert [r["instruction"] for r in judge.unparsed] == ["q4", "second4"]  # the question graded in that turn
    assert all(r["part"] == "mt_bench" and r["raw_output"] == GARBLED for r in judge.unparsed)


@pytest.mark.reliability
def test_mt_bench_grades_above_the_limit_raise():
    questions, answers = mt_bench_set(10)
    judge = LocalLLMJudge(PROMPTS, generate_fn=stub_generate({"q1", "q2"}), max_unparsed_fraction=0.1)
    with pytest.raises(JudgeParseError, match=r"4 of 20 items .*judge\.max_unparsed_fraction"):
        grade(judge, questions, answers)


@pytest.mark.reliability
def test_judge_as_reward_stands_in_the_parsed_mean_and_fails_when_nothing_parses():
    judge = LocalLLMJudge(PROMPTS, generate_fn=stub_generate({"q2"}), max_unparsed_fraction=0.5)
    rewards = judge([f"q{i}" for i in range(4)], ["a"] * 4)
    assert torch.isfinite(rewards.scores).all() and rewards.scores.mean() == pytest.approx(7.0)
    assert judge.failures == 1
    with pytest.raises(JudgeParseError, match="none parsed"):
        LocalLLMJudge(PROMPTS, generate_fn=stub_generate({"q0"}), max_unparsed_fraction=1.0)(["q0"], ["a"])


@pytest.mark.reliability
def test_a_random_tiny_model_fails_with_the_config_field_named(tiny_path, tiny_tokenizer):
    from rmens.models.backbone import load_policy

    judge = LocalLLMJudge(PROMPTS, load_policy(tiny_path), tiny_tokenizer, max_new_tokens=4)
    try:
        ratings = judge.score(["q0", "q1"], ["a", "b"])
        assert judge.failures == int(torch.isnan(ratings).sum())
        judge.check_unparsed(judge.unparsed, 2, "tiny")
    except JudgeParseError as err:  # a random model writes no [[rating]]: the usual outcome
        assert "judge.max_unparsed_fraction" in str(err)
    else:
        assert judge.failures == 0


@pytest.mark.reliability
def test_config_bounds_and_load_judge_passes_the_limit(tmp_path, monkeypatch):
    with pytest.raises(ValidationError):
        GoldConfig(kind="local_llm", model="m", max_unparsed_fraction=1.5)
    with pytest.raises(ValueError, match="max_unparsed_fraction"):
        LocalLLMJudge(PROMPTS, generate_fn=lambda c: [], max_unparsed_fraction=-0.1)
    (tmp_path / "mt_bench").mkdir()
    (tmp_path / "mt_bench" / "judge_prompts.jsonl").write_text(
        "".join(json.dumps({"name": k, **v}) + "\n" for k, v in PROMPTS.items()))
    import rmens.data.loaders as loaders
    import rmens.models.backbone as backbone
    from rmens.pipeline.gold import load_gold

    monkeypatch.setattr(loaders, "data_root", lambda: tmp_path)
    monkeypatch.setattr(backbone, "load_policy", lambda *a, **k: object())
    monkeypatch.setattr(backbone, "load_tokenizer", lambda *a, **k: object())
    judge = load_gold(GoldConfig(kind="local_llm", model="m", max_unparsed_fraction=0.25), None)
    assert isinstance(judge, LocalLLMJudge) and judge.max_unparsed_fraction == 0.25


@pytest.mark.reliability
def test_evaluate_writes_unparsed_records_to_the_stage_folder(tmp_path):
    from rmens.io import read_jsonl
    from rmens.pipeline.gold import write_unparsed

    judge = LocalLLMJudge(PROMPTS, generate_fn=stub_generate({"q3"}))
    assert write_unparsed(tmp_path, judge) == 0 and not (tmp_path / "unparsed.jsonl").exists()
    judge.score(["q3", "q4"], ["a", "b"])
    assert write_unparsed(tmp_path, judge) == 1
    [row] = read_jsonl(tmp_path / "unparsed.jsonl")
    assert row["instruction"] == "q3" and row["raw_output"] == GARBLED and row["index"] == 0
