"""Small hand-made folders in AlpacaEval's annotation format, for tests that must not need the real data."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

FILES = {"ae1": ("ae1_gpt4_pairs", "text_davinci_003"), "ae2": ("ae2_gpt4turbo_pairs", "gpt4_1106_preview")}


def record(instruction: str, reference: str, output: str, generator: str, preference, ref_generator: str = "ref"):
    return {"instruction": instruction, "dataset": "test", "output_1": reference, "generator_1": ref_generator,
            "output_2": output, "generator_2": generator, "preference": preference, "annotator": "test"}


def write_annotations(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for rec in records:
            handle.write(json.dumps(rec) + "\n")
    return path


def synthetic_annotations(folder: Path, instructions: list[str], split: str = "train", generators: int = 20,
                          seed: int = 0) -> Path:
    """AE1 and AE2 files for `instructions`: each generator answers with a few sentences, and the judge
    prefers the answers that mention 'apple' (a learnable, length-independent signal)."""
    rng = random.Random(seed)
    words = ["apple", "pear", "stone", "river", "cloud", "paper", "green", "quiet"]
    for judge, (prefix, ref_generator) in FILES.items():
        rows = []
        for instruction in instructions:
            reference = f"A reference answer to {instruction}."
            for g in range(generators):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
                wins = "apple" in text
                preference = (2 if wins else 1) if judge == "ae1" else (1.9 if wins else 1.1)
                rows.append(record(instruction, reference, text, f"gen{g}", preference, ref_generator))
            rows.append(record(instruction, reference, reference, ref_generator, 1.5, ref_generator))  # self-pair
        write_annotations(folder / f"{prefix}.{split}.jsonl.gz", rows)
    return folder


def instructions(n: int, start: int = 0) -> list[str]:
    return [f"Question number {i}: say something about fruit." for i in range(start, start + n)]


def synthetic_grades(path: Path, questions: int = 4, systems: int = 6, seed: int = 0) -> Path:
    """An MT-Bench grades file in FastChat's release format: `questions` odd ids x 2 turns x `systems`, graded
    higher when the answer mentions 'apple' (the same learnable signal as synthetic_annotations)."""
    rng = random.Random(seed)
    words = ["apple", "pear", "stone", "river", "cloud", "paper", "green", "quiet"]
    rows = []
    for q in range(questions):
        qid = 81 + 2 * q
        for s in range(systems):
            answers = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(2)]
            for turn in (1, 2):
                row = {"question_id": qid, "model": f"system-{s}", "turn": turn,
                       "score": 8 if "apple" in answers[turn - 1] else rng.randint(2, 6),
                       "judge": ["gpt-4", "single-v1" if turn == 1 else "single-v1-multi-turn"],
                       "category": "writing", "question_1": f"First question {qid} about fruit.",
                       "answer_1": answers[0]}
                if turn == 2:
                    row.update(question_2=f"Follow-up {qid}: and vegetables?", answer_2=answers[1])
                rows.append(row)
    return write_annotations(path, rows)
