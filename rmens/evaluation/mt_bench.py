"""MT-Bench: answer the 80 two-turn questions and grade each answer 1-10.

Grading follows FastChat's llm_judge single-answer mode: a local LLM judge with the single-v1 prompt
(single-math-v1 with GPT-4's reference answer for math, reasoning and coding), and the multi-turn
variants for the second turn. A reward-model judge can stand in through `RewardScoreMapping`, a linear
calibration of its reward onto the 1-10 scale (documented below); such scores are a local proxy and
are not comparable with GPT-4-graded leaderboard numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rmens.evaluation.judges import Judge, LocalLLMJudge
from rmens.generation_config import GenerationConfig

if TYPE_CHECKING:
    from rmens.generation import Sampler

NEED_REFERENCE = {"math", "reasoning", "coding"}  # FastChat's NEED_REF_CATS


def load_questions(source: str | Path) -> list[dict]:
    """question.jsonl from a folder or file, or a Hugging Face dataset id with prompt/category columns."""
    path = Path(source)
    if path.is_dir():
        path = path / "question.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    import datasets  # a hub id, e.g. HuggingFaceH4/mt_bench_prompts (needs a network or HF cache)

    rows = datasets.load_dataset(str(source), split="train")
    return [{"question_id": r.get("prompt_id", i), "category": r["category"], "turns": list(r["prompt"]),
             "reference": r.get("reference") or None} for i, r in enumerate(rows)]


def load_reference_answers(folder: str | Path) -> dict[int, list[str]]:
    path = Path(folder) / "reference_answer" / "gpt-4.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["question_id"]: r["choices"][0]["turns"] for r in rows}


def answer_questions(sampler: Sampler, questions: list[dict], cfg: GenerationConfig) -> list[dict]:
    """Two turns per question (sampler: rmens.generation.open_sampler's); the second is asked in the
    conversation that holds the first answer."""
    first = sampler([q["turns"][0] for q in questions], cfg, indices=(1,)).texts
    conversations = [[{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": a},
                      {"role": "user", "content": q["turns"][1]}] for q, a in zip(questions, first)]
    second = sampler(conversations, cfg, indices=(2,)).texts  # the turn
    return [{"question_id": q["question_id"], "category": q["category"], "turns": [a1, a2]}
            for q, a1, a2 in zip(questions, first, second)]


@dataclass
class RewardScoreMapping:
    """Linear map from a reward-model judge's reward to MT-Bench's 1-10 scale, clipped to [1, 10].

    Two anchors fix it: `low_reward` (the judge's mean reward for a fixed non-answer, graded 1 by the
    MT-Bench rubric) maps to 1, and `high_reward` (its mean reward for GPT-4-Turbo's AlpacaEval outputs)
    maps to `high_score` = 9.32, GPT-4-Turbo's published MT-Bench score. Build it with `calibrate`.
    """

    low_reward: float
    high_reward: float
    high_score: float = 9.32

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        span = self.high_reward - self.low_reward
        if span <= 0:
            raise ValueError("calibration failed: the judge does not prefer the strong anchor over the non-answer")
        return (1 + (rewards - self.low_reward) / span * (self.high_score - 1)).clamp(1.0, 10.0)

    @classmethod
    def calibrate(cls, judge: Judge, instructions: list[str], strong_outputs: list[str],
                  non_answer: str = "I don't know.", high_score: float = 9.32) -> RewardScoreMapping:
        high = float(judge.score(instructions, strong_outputs).mean())
        low = float(judge.score(instructions, [non_answer] * len(instructions)).mean())
        return cls(low_reward=low, high_reward=high, high_score=high_score)


def grade(judge: Judge, questions: list[dict], answers: list[dict], references: dict[int, list[str]] | None = None,
          mapping: RewardScoreMapping | None = None) -> list[dict]:
    """One grade per (question, turn): {question_id, category, turn, score[, raw]}."""
    references = references or {}
    by_id = {q["question_id"]: q for q in questions}
    rows = []
    if isinstance(judge, LocalLLMJudge):
        start = len(judge.unparsed)
        for turn in (1, 2):
            for qid_group, prompt_name in _prompt_groups(answers, by_id, references, turn):
                fields = [_fields(by_id[a["question_id"]], a, references.get(a["question_id"]), turn)
                          for a in qid_group]
                mark = len(judge.unparsed)
                scores = judge.grade(prompt_name, fields).tolist()
                for record in judge.unparsed[mark:]:  # NaN grades: unparsed outputs, left out of the means
                    record.update(part="mt_bench", question_id=qid_group[record["index"]]["question_id"], turn=turn)
                for a, score in zip(qid_group, scores):
                    rows.append({"question_id": a["question_id"], "category": a["category"], "turn": turn,
                                 "score": score})
        # Over all grades, not per prompt group (a group of three math questions is too small to judge by).
        judge.check_unparsed(judge.unparsed[start:], len(rows), "MT-Bench grading")
        return rows
    if mapping is None:
        raise ValueError("a reward-model judge needs a RewardScoreMapping to grade on MT-Bench's 1-10 scale")
    prompts1 = [by_id[a["question_id"]]["turns"][0] for a in answers]
    prompts2 = [[{"role": "user", "content": by_id[a["question_id"]]["turns"][0]},
                 {"role": "assistant", "content": a["turns"][0]},
                 {"role": "user", "content": by_id[a["question_id"]]["turns"][1]}] for a in answers]
    for turn, prompts in ((1, prompts1), (2, prompts2)):
        raw = judge.score(prompts, [a["turns"][turn - 1] for a in answers])
        for a, r, s in zip(answers, raw.tolist(), mapping(raw).tolist()):
            rows.append({"question_id": a["question_id"], "category": a["category"], "turn": turn,
                         "score": s, "raw": r})
    return rows


def _prompt_groups(answers, by_id, references, turn):
    with_ref = [a for a in answers if by_id[a["question_id"]]["category"] in NEED_REFERENCE
                and a["question_id"] in references]
    plain = [a for a in answers if a not in with_ref]
    suffix = "" if turn == 1 else "-multi-turn"
    return [(group, name + suffix) for group, name in ((plain, "single-v1"), (with_ref, "single-math-v1")) if group]


def _fields(question: dict, answer: dict, reference: list[str] | None, turn: int) -> dict:
    if turn == 1:
        fields = {"question": question["turns"][0], "answer": answer["turns"][0]}
        if reference:
            fields["ref_answer_1"] = reference[0]
        return fields
    fields = {"question_1": question["turns"][0], "question_2": question["turns"][1],
              "answer_1": answer["turns"][0], "answer_2": answer["turns"][1]}
    if reference:
        fields.update(ref_answer_1=reference[0], ref_answer_2=reference[1])
    return fields


def summarize(grades: list[dict]) -> dict:
    """Mean score overall, per turn and per category x turn. NaN grades (a judge output without a rating)
    are left out of every mean rather than given a stand-in grade, and counted in failed / unparsed."""
    valid = [g for g in grades if g["score"] == g["score"]]

    def mean(rows):
        return sum(r["score"] for r in rows) / len(rows) if rows else float("nan")

    out = {"score": mean(valid), "turn_1": mean([g for g in valid if g["turn"] == 1]),
           "turn_2": mean([g for g in valid if g["turn"] == 2]), "failed": len(grades) - len(valid),
           "unparsed": len(grades) - len(valid),
           "unparsed_fraction": (len(grades) - len(valid)) / len(grades) if grades else 0.0, "by_category": {}}
    for category in sorted({g["category"] for g in valid}):
        rows = [g for g in valid if g["category"] == category]
        out["by_category"][category] = {"turn_1": mean([g for g in rows if g["turn"] == 1]),
                                        "turn_2": mean([g for g in rows if g["turn"] == 2]), "all": mean(rows)}
    return out
