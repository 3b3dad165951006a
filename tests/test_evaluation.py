import json
import math

import pytest
import torch
from conftest import TINY, real_data_dir, requires_real_data

from rmens.data.schema import PreferencePair
from rmens.evaluation import alpaca_eval as ae
from rmens.evaluation.curves import curve_from_bon, fit, reliability_diagram, save_curves
from rmens.evaluation.judges import (
    AlpacaEvalJudge,
    Judge,
    LocalLLMJudge,
    RewardModelJudge,
    judge_agreement,
    load_judge_prompts,
    parse_rating,
    parse_verdict,
)
from rmens.evaluation.mt_bench import RewardScoreMapping, grade, load_questions, summarize
from rmens.evaluation.offline_judge import agreement_report, judge_split, length_rule_accuracy
from rmens.evaluation.reward_model import evaluate_reward_model
from rmens.generation_config import GenerationConfig
from rmens.models.config import EnsembleConfig
from rmens.models.ensemble import build_ensemble
from rmens.reward import CallableReward


class FixedJudge(Judge):
    """P(b wins) and scores given by hand."""

    name = "fixed"

    def __init__(self, p_b=None, score_fn=None):
        self.p_b, self.score_fn = p_b, score_fn

    def compare(self, instructions, a, b):
        return torch.tensor(self.p_b, dtype=torch.float64)

    def score(self, instructions, outputs):
        return torch.tensor([self.score_fn(o) for o in outputs], dtype=torch.float64)


@pytest.fixture(scope="module")
def saved_ensemble(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("judge") / "ens"
    build_ensemble(EnsembleConfig(kind="linear", k=2, backbone=TINY)).eval().save(path, tiny_tokenizer)
    return path


def test_reward_model_judge_compares_by_bradley_terry(saved_ensemble):
    judge = RewardModelJudge(saved_ensemble)
    prompts, a, b = ["q1", "q2"], ["short", "apple"], ["a longer answer", "banana"]
    expected = torch.sigmoid(judge.score(prompts, b) - judge.score(prompts, a))
    torch.testing.assert_close(judge.compare(prompts, a, b), expected)
    assert judge(prompts, a).members.shape == (2, 2)


def test_sequence_classification_reward_model_as_judge(tmp_path, tiny_path, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1)
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "seqcls")
    tiny_tokenizer.save_pretrained(tmp_path / "seqcls")
    judge = RewardModelJudge(tmp_path / "seqcls")
    from rmens.data.encoding import PairEncoder

    ids = torch.tensor([PairEncoder(tiny_tokenizer, 512).encode("q", "an answer")])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits[0, 0]
    assert judge.score(["q"], ["an answer"])[0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_alpaca_eval_judge_needs_a_key_and_maps_preferences(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_CLIENT_CONFIG_PATH", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        AlpacaEvalJudge()

    class FakeAnnotator:
        def annotate_pairs(self, records):
            self.records = records
            return [{**r, "preference": p} for r, p in zip(records, [1, 2, 1.5, None])]

    fake = FakeAnnotator()
    p_b = AlpacaEvalJudge(annotator=fake).compare(["i"] * 4, ["a"] * 4, ["b"] * 4)
    assert p_b[:3].tolist() == [0.0, 1.0, 0.5] and math.isnan(p_b[3])
    assert fake.records[0] == {"instruction": "i", "output_1": "a", "output_2": "b"}


def test_rating_and_verdict_parsers():
    assert parse_rating("Good. Rating: [[7]]") == 7.0
    assert parse_rating("Rating: [8.5]") == 8.5
    assert math.isnan(parse_rating("no rating")) and math.isnan(parse_rating("[[42]]"))
    assert parse_verdict("... [[B]]") == 1.0 and parse_verdict("[[C]]") == 0.5
    assert math.isnan(parse_verdict("[[A]] or [[B]]"))


MT_PROMPTS = {
    "single-v1": {"system_prompt": "judge", "prompt_template": "Q={question} A={answer}"},
    "single-math-v1": {"system_prompt": "judge", "prompt_template": "Q={question} R={ref_answer_1} A={answer}"},
    "single-v1-multi-turn": {"system_prompt": "judge",
                             "prompt_template": "{question_1}|{answer_1}|{question_2}|{answer_2}"},
    "single-math-v1-multi-turn": {"system_prompt": "judge",
                                  "prompt_template": "{question_1}|{ref_answer_1}|{ref_answer_2}|{answer_2}"},
    "pair-v2": {"system_prompt": "judge", "prompt_template": "{question} A:{answer_a} B:{answer_b}"},
}


def test_local_llm_judge_fills_fastchat_templates_and_swaps_pairs():
    seen = []

    def fake_generate(conversations):
        seen.extend(conversations)
        return ["[[B]]" if "A:x" in c[-1]["content"] else "[[A]]" for c in conversations]

    judge = LocalLLMJudge(MT_PROMPTS, generate_fn=fake_generate)
    # 'y' wins in both orders -> P(b = y) = 1
    assert judge.compare(["q"], ["x"], ["y"]).tolist() == [1.0]
    assert seen[0][0] == {"role": "system", "content": "judge"} and seen[0][1]["content"] == "q A:x B:y"
    questions = [{"question_id": 1, "category": "writing", "turns": ["w1", "w2"]},
                 {"question_id": 2, "category": "math", "turns": ["m1", "m2"]}]
    answers = [{"question_id": 1, "category": "writing", "turns": ["a1", "a2"]},
               {"question_id": 2, "category": "math", "turns": ["b1", "b2"]}]
    seen.clear()
    judge.generate_fn = lambda convs: (seen.extend(convs), ["Rating: [[6]]"] * len(convs))[1]
    grades = grade(judge, questions, answers, references={2: ["r1", "r2"]})
    prompts = [c[-1]["content"] for c in seen]
    assert "Q=w1 A=a1" in prompts and "Q=m1 R=r1 A=b1" in prompts
    assert "w1|a1|w2|a2" in prompts and "m1|r1|r2|b2" in prompts
    assert sorted((g["question_id"], g["turn"], g["score"]) for g in grades) == [
        (1, 1, 6.0), (1, 2, 6.0), (2, 1, 6.0), (2, 2, 6.0)]


def test_local_llm_judge_runs_on_a_real_model(tiny_path, tiny_tokenizer):
    from rmens.models.backbone import load_policy

    judge = LocalLLMJudge(MT_PROMPTS, load_policy(tiny_path), tiny_tokenizer, max_new_tokens=4)
    ratings = judge.score(["q"], ["a"])
    assert ratings.shape == (1,) and judge.failures == int(torch.isnan(ratings).sum())


def test_reward_judge_mt_bench_mapping_and_summary():
    mapping = RewardScoreMapping(low_reward=-1.0, high_reward=3.0, high_score=9.0)
    torch.testing.assert_close(mapping(torch.tensor([-1.0, 1.0, 3.0, 99.0, -50.0])),
                               torch.tensor([1.0, 5.0, 9.0, 10.0, 1.0]))
    judge = FixedJudge(score_fn=len)
    calibrated = RewardScoreMapping.calibrate(judge, ["i", "j"], ["x" * 20, "y" * 40], non_answer="no")
    assert (calibrated.low_reward, calibrated.high_reward) == (2.0, 30.0)
    questions = [{"question_id": 1, "category": "writing", "turns": ["w1", "w2"]},
                 {"question_id": 2, "category": "math", "turns": ["m1", "m2"]}]
    answers = [{"question_id": 1, "category": "writing", "turns": ["a" * 2, "a" * 16]},
               {"question_id": 2, "category": "math", "turns": ["b" * 9, "b" * 30]}]
    with pytest.raises(ValueError, match="RewardScoreMapping"):
        grade(judge, questions, answers)
    grades = grade(judge, questions, answers, mapping=calibrated)
    # score = 1 + (len - 2) / 28 * 8.32
    expected = {(1, 1): 1.0, (1, 2): 1 + 14 / 28 * 8.32, (2, 1): 1 + 7 / 28 * 8.32, (2, 2): 1 + 28 / 28 * 8.32}
    for g in grades:
        assert g["score"] == pytest.approx(expected[(g["question_id"], g["turn"])])
    summary = summarize(grades + [{"question_id": 3, "category": "math", "turn": 1, "score": float("nan")}])
    assert summary["failed"] == 1
    assert summary["turn_1"] == pytest.approx((1.0 + expected[(2, 1)]) / 2)
    assert summary["by_category"]["math"]["turn_2"] == pytest.approx(expected[(2, 2)])
    assert summary["score"] == pytest.approx(sum(expected.values()) / 4)


def test_win_rate_uses_alpaca_eval_metrics_and_writes_outputs(tmp_path):
    judge = FixedJudge(p_b=[1.0, 0.0, 1.0, 0.5])
    result = ae.win_rate(judge, ["i1", "i2", "i3", "i4"], ["o1", "o2", "o3", "o4"], ["r1", "r2", "r3", "r4"],
                         generator="mine", output_dir=tmp_path)
    assert result["win_rate"] == pytest.approx(62.5)  # (1 + 0 + 1 + 0.5) / 4
    assert result["n_wins"] == 2 and result["n_wins_base"] == 1 and result["n_draws"] == 1
    p = torch.tensor([1.0, 0.0, 1.0, 0.5])
    assert result["standard_error"] == pytest.approx(float(p.std() / 2 * 100), rel=1e-6)
    outputs = json.loads((tmp_path / "model_outputs.json").read_text())
    assert outputs[0] == {"instruction": "i1", "output": "o1", "generator": "mine", "dataset": None}
    assert result["length_controlled"] is not None or "get_length_controlled_winrate" in \
        result["length_controlled_unavailable"]


def test_agreement_and_length_rule():
    pairs = [PreferencePair("a", "long answer", "x"), PreferencePair("b", "y", "longer one"),
             PreferencePair("c", "mid", "zz")]
    report = agreement_report(CallableReward(lambda p, r: len(r)), pairs)
    assert report["agreement"] == pytest.approx(2 / 3) and report["length_rule_agreement"] == pytest.approx(2 / 3)
    assert report["n_longer_lost"] == 1 and report["agreement_longer_lost"] == 0.0
    assert length_rule_accuracy(pairs[:1]) == 1.0
    train, held = judge_split(pairs * 10, 0.5)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held})
    assert judge_agreement(torch.tensor([0.9, 0.1, 0.5, float("nan")]), torch.tensor([1, 1, 1, 1])) == \
        pytest.approx(1.5 / 3)


def test_curve_fits_recover_known_parameters(tmp_path):
    d = [0.5, 1.0, 1.5, 2.0, 2.5]
    bon = fit("bon", d, [x * (2.0 - 0.5 * x) for x in d])
    assert bon["alpha"] == pytest.approx(2.0) and bon["beta"] == pytest.approx(0.5)
    assert bon["d_peak"] == pytest.approx(2.0)
    rl = fit("rl", d, [x * (1.0 - 0.8 * math.log(x)) for x in d])
    assert rl["alpha"] == pytest.approx(1.0) and rl["beta"] == pytest.approx(0.8)
    assert rl["d_peak"] == pytest.approx(math.exp(1.0 / 0.8 - 1))
    rows = [{"n": n, "sqrt_kl": s, "proxy": p, "gold": g}
            for n, s, p, g in [(1, 0.0, 1.0, 2.0), (2, 0.55, 1.5, 2.2), (4, 1.0, 2.0, 2.3), (8, 1.4, 2.6, 2.1)]]
    curves = curve_from_bon(rows, ["proxy", "gold"])
    assert curves["gold"]["score"] == pytest.approx([0.0, 0.2, 0.3, 0.1])
    files = save_curves(curves, "bon", tmp_path, "test")
    assert all(path.stat().st_size > 0 for path in files.values())
    assert reliability_diagram([{"confidence": 0.6, "accuracy": 0.5}], tmp_path / "r.png").is_file()


def test_evaluate_reward_model_writes_metrics_and_diagram(saved_ensemble, tmp_path, pairs):
    metrics = evaluate_reward_model(saved_ensemble, pairs[:12], tmp_path)
    assert metrics["n_pairs"] == 12 and len(metrics["member_accuracy"]) == 2
    assert metrics["length_rule_accuracy"] == 1.0 and metrics["n_longer_lost"] == 0  # synthetic: longer wins
    assert (tmp_path / "rm_metrics.json").is_file() and (tmp_path / "reliability.png").is_file()


def test_ppo_checkpoints_give_kl_and_scores(tmp_path):
    from rmens.data.prompts import synthetic_prompts
    from rmens.evaluation.ppo_eval import evaluate_run
    from rmens.ppo.config import PPOConfig
    from rmens.ppo.trainer import PPOTrainer

    cfg = PPOConfig(policy=TINY, steps=2, rollout_batch_size=4, step_batch_size=4, lr=1e-2, warmup_steps=0,
                    progress=False, checkpoint_every=1, generation=GenerationConfig(max_new_tokens=6))
    reward = CallableReward(lambda p, r: r.count("e"))
    PPOTrainer(cfg, synthetic_prompts(8), reward, tmp_path).train()
    points = evaluate_run(tmp_path, synthetic_prompts(4), {"proxy": reward}, samples_per_prompt=2)
    assert [p["step"] for p in points] == [0, 1, 2]
    assert points[0]["kl"] == 0.0 and all(math.isfinite(p["kl"]) for p in points)


@requires_real_data
def test_mt_bench_questions_and_judge_prompts_load():
    root = real_data_dir() / "mt_bench"
    questions = load_questions(root)
    assert len(questions) == 80 and len({q["category"] for q in questions}) == 8
    assert all(len(q["turns"]) == 2 for q in questions)
    prompts = load_judge_prompts(root / "judge_prompts.jsonl")
    assert {"single-v1", "single-math-v1", "single-v1-multi-turn", "pair-v2"} <= set(prompts)
