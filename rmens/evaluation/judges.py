"""Judges behind one interface.

    judge.score(instructions, outputs) -> Tensor[n]            higher is better (a reward, or a 1-10 grade)
    judge.compare(instructions, outputs_a, outputs_b) -> Tensor[n]   P(b is preferred over a)

Every judge is also a reward function (`judge(prompts, responses) -> Rewards`), so Best-of-n and PPO
can log or optimise it like any reward. Kinds:

- RewardModelJudge: a saved RewardEnsemble (its aggregated raw reward) or any Hugging Face
  sequence-classification reward model; P(b > a) = sigmoid(r_b - r_a) (Bradley-Terry).
- AlpacaEvalJudge: alpaca_eval's own annotators (GPT-4 and others) through the alpaca_eval library;
  needs the provider's API key.
- LocalLLMJudge: a local causal LM prompted with FastChat's MT-Bench judge prompts
  (single-answer 1-10 grading and pairwise [[A]]/[[B]]/[[C]] verdicts), for users with a strong local model.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from rmens.data.encoding import Prompt, as_messages
from rmens.generation_config import GenerationConfig
from rmens.models.config import AggregationConfig
from rmens.reward import EnsembleReward, Rewards

log = logging.getLogger(__name__)


class Judge:
    name: str = "judge"

    def score(self, instructions: list[Prompt], outputs: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def compare(self, instructions: list[Prompt], outputs_a: list[str], outputs_b: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, prompts: list[Prompt], responses: list[str]) -> Rewards:
        return Rewards(scores=self.score(prompts, responses).float()).check(len(prompts), f"judge {self.name}")


def _check_lengths(*lists) -> None:
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"judge inputs differ in length: {[len(x) for x in lists]}")


class RewardModelJudge(Judge):
    """A reward model as judge: a saved RewardEnsemble folder or a sequence-classification model id.

    An ensemble judges with its members' raw scores, not the standardised ones every optimised reward
    uses: its probabilities sigmoid(r_b - r_a) are Bradley-Terry probabilities only on the scale the
    members were trained on, and standardising would rescale that logit. So score, compare and the judge as
    a reward all stay on that one scale (a one-member judge ranks the same either way). Statistics are
    therefore not required of a judge's folder.
    """

    def __init__(self, source: str | Path, aggregation: AggregationConfig | None = None, batch_size: int = 16,
                 max_length: int = 512, name: str | None = None):
        self.name = name or Path(str(source)).name
        if (Path(source) / "ensemble.json").is_file():
            reward = EnsembleReward.from_folder(source, aggregation, batch_size=batch_size, allow_unstandardised=True)
            self._reward = functools.partial(reward, standardise=False)
        else:
            self._reward = _SequenceClassifierReward(str(source), batch_size, max_length)

    def score(self, instructions, outputs) -> torch.Tensor:
        _check_lengths(instructions, outputs)
        return self._reward(instructions, outputs).scores

    def compare(self, instructions, outputs_a, outputs_b) -> torch.Tensor:
        _check_lengths(instructions, outputs_a, outputs_b)
        both = self.score(list(instructions) * 2, list(outputs_a) + list(outputs_b))
        n = len(instructions)
        return torch.sigmoid(both[n:] - both[:n])

    def __call__(self, prompts, responses) -> Rewards:
        return self._reward(prompts, responses)


class _SequenceClassifierReward:
    """Any Hugging Face reward model with a single-logit classification head (e.g. OpenAssistant's)."""

    def __init__(self, model_id: str, batch_size: int, max_length: int):
        from transformers import AutoModelForSequenceClassification

        from rmens.data.encoding import PairEncoder
        from rmens.models.backbone import load_tokenizer, resolve_model

        path = resolve_model(model_id)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model_id} has {self.model.config.num_labels} labels; a reward model has one")
        tokenizer = load_tokenizer(path)
        self.model.config.pad_token_id = tokenizer.pad_token_id
        self.encoder = PairEncoder(tokenizer, max_length)
        self.pad_id = tokenizer.pad_token_id
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts, responses) -> Rewards:
        from rmens.data.encoding import pad_batch

        seqs = [self.encoder.encode(p, r) for p, r in zip(prompts, responses)]
        scores = []
        for start in range(0, len(seqs), self.batch_size):
            batch = pad_batch(seqs[start: start + self.batch_size], self.pad_id)
            scores.append(self.model(**batch).logits[:, 0].float())
        return Rewards(scores=torch.cat(scores)).check(len(prompts), "sequence-classification reward")


class AlpacaEvalJudge(Judge):
    """alpaca_eval's annotators (e.g. weighted_alpaca_eval_gpt4_turbo) via the alpaca_eval library."""

    def __init__(self, annotators_config: str = "weighted_alpaca_eval_gpt4_turbo", cache_path: str | None = None,
                 annotator=None):
        self.name = annotators_config
        if annotator is None:
            if not (os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_CLIENT_CONFIG_PATH")):
                raise RuntimeError(f"the alpaca_eval annotator {annotators_config!r} calls OpenAI: set OPENAI_API_KEY "
                                   "or OPENAI_CLIENT_CONFIG_PATH, or use a reward-model judge offline")
            from alpaca_eval.annotators import PairwiseAnnotator

            # caching_path must not default to alpaca_eval's package folder (it writes there).
            annotator = PairwiseAnnotator(annotators_config=annotators_config, caching_path=cache_path)
        self.annotator = annotator

    def compare(self, instructions, outputs_a, outputs_b) -> torch.Tensor:
        _check_lengths(instructions, outputs_a, outputs_b)
        records = [{"instruction": i if isinstance(i, str) else as_messages(i)[-1]["content"],
                    "output_1": a, "output_2": b} for i, a, b in zip(instructions, outputs_a, outputs_b)]
        annotated = self.annotator.annotate_pairs(records)
        prefs = [row.get("preference") for row in annotated]
        # alpaca_eval: 1 = output_1 preferred, 2 = output_2 preferred, 1.5 = draw, None = failed
        return torch.tensor([float(p) - 1.0 if p is not None else float("nan") for p in prefs])

    def score(self, instructions, outputs) -> torch.Tensor:
        raise NotImplementedError("alpaca_eval annotators compare two outputs; use compare() against references")


# -- local LLM-as-judge (FastChat MT-Bench prompts) ----------------------------------------------------

RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
VERDICTS = {"[[A]]": 0.0, "[[B]]": 1.0, "[[C]]": 0.5}


def load_judge_prompts(path: str | Path) -> dict[str, dict]:
    """FastChat's judge_prompts.jsonl -> {name: prompt record}."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {row["name"]: row for row in rows}


def parse_rating(text: str) -> float:
    """FastChat's rule: the number in [[x]] (or [x] as fallback); NaN when the judge gave none in 1..10."""
    match = RATING.search(text) or RATING_FALLBACK.search(text)
    if not match:
        return float("nan")
    value = float(match.group(1))
    return value if 1 <= value <= 10 else float("nan")


def parse_verdict(text: str) -> float:
    """P(B better) from a pairwise verdict: [[A]] -> 0, [[B]] -> 1, [[C]] -> 0.5; NaN when absent or ambiguous."""
    found = {v for token, v in VERDICTS.items() if token in text}
    return found.pop() if len(found) == 1 else float("nan")


class JudgeParseError(ValueError):
    """More of a judge's outputs held no grade or verdict than judge.max_unparsed_fraction allows."""


INSTRUCTION_PREFIX = 200  # characters of the instruction kept in an unparsed-output record
RAW_PREFIX = 500  # characters of the judge's raw output kept in an unparsed-output record


class LocalLLMJudge(Judge):
    """A local causal LM with FastChat's judge prompts; ratings 1-10 and pairwise verdicts.

    `single_prompt` / `pair_prompt` are records from judge_prompts.jsonl; `generate_fn(messages_list) -> texts`
    defaults to greedy decoding with rmens.generation on the given model.

    An output without a usable [[rating]] or verdict gives NaN for its item and a record in `unparsed`
    (where, index, instruction prefix, raw output prefix). `grade` and `compare` only record; the callers
    that turn judgements into numbers (alpaca_eval.win_rate, mt_bench.grade, and this judge as a reward)
    call `check_unparsed`, which warns with the count and raises JudgeParseError only when the share of
    unparsed items exceeds `max_unparsed_fraction` (judge.max_unparsed_fraction in the pipeline config).
    """

    def __init__(self, prompts: dict[str, dict], model=None, tokenizer=None, *, max_new_tokens: int = 256,
                 batch_size: int = 4, generate_fn=None, swap_pairs: bool = True, max_unparsed_fraction: float = 0.1,
                 name: str = "local-llm"):
        if not 0 <= max_unparsed_fraction <= 1:
            raise ValueError(f"max_unparsed_fraction must lie in [0, 1], got {max_unparsed_fraction}")
        self.prompts = prompts
        self.name = name
        self.swap_pairs = swap_pairs
        self.max_unparsed_fraction = max_unparsed_fraction
        if generate_fn is None:
            if model is None or tokenizer is None:
                raise ValueError("LocalLLMJudge needs a model and tokenizer, or generate_fn")
            from rmens.generation import generate

            cfg = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=False)
            generate_fn = lambda conversations: generate(model, tokenizer, conversations, cfg).texts  # noqa: E731
        self.generate_fn = generate_fn
        self.unparsed: list[dict] = []  # every unparsed item since construction, oldest first

    @property
    def failures(self) -> int:
        """How many judged items had no parseable output so far."""
        return len(self.unparsed)

    def _record(self, where: str, index: int, instruction: str, raw: str, **extra) -> None:
        self.unparsed.append({"where": where, "index": index, "instruction": str(instruction)[:INSTRUCTION_PREFIX],
                              "raw_output": str(raw)[:RAW_PREFIX], **extra})

    def check_unparsed(self, records: list[dict], total: int, where: str) -> dict:
        """Report `records` (this judge's unparsed items among `total` judged in `where`): a warning with the
        count, and JudgeParseError when their share exceeds max_unparsed_fraction or nothing parsed at all.
        -> {"unparsed": count, "unparsed_fraction": share}."""
        count = len(records)
        fraction = count / total if total else 0.0
        if not count:
            return {"unparsed": 0, "unparsed_fraction": 0.0}
        log.warning("%s: %d of %d outputs of judge %s (%.1f%%) held no parseable grade or verdict and are left "
                    "out (limit: judge.max_unparsed_fraction=%g)", where, count, total, self.name, 100 * fraction,
                    self.max_unparsed_fraction)
        if fraction > self.max_unparsed_fraction or count == total:
            example = records[0]
            limit = self.max_unparsed_fraction
            why = "none parsed" if fraction <= limit else f"above judge.max_unparsed_fraction={limit:g}"
            raise JudgeParseError(
                f"{where}: the output of judge {self.name} did not parse for {count} of {total} items "
                f"({fraction:.1%}), {why}. Raise judge.max_unparsed_fraction (now {limit:g}) to accept this, or use "
                f"a judge model that follows the [[rating]] / [[A]] [[B]] [[C]] format. Example raw output (item "
                f"{example['index']}, {example['where']}): {example['raw_output'][:300]!r}")
        return {"unparsed": count, "unparsed_fraction": fraction}

    @staticmethod
    def _messages(record: dict, **fields) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": record["system_prompt"]}] if record.get("system_prompt") else []
        return messages + [{"role": "user", "content": record["prompt_template"].format(**fields)}]

    def grade(self, prompt_name: str, fields: list[dict]) -> torch.Tensor:
        """Ratings with a named single-answer prompt (single-v1, single-math-v1, ...-multi-turn); NaN where
        the output held no rating in 1..10 (recorded in `unparsed`)."""
        record = self.prompts[prompt_name]
        texts = self.generate_fn([self._messages(record, **f) for f in fields])
        ratings = torch.tensor([parse_rating(t) for t in texts])
        for i in torch.isnan(ratings).nonzero().flatten().tolist():
            self._record(prompt_name, i, fields[i].get("question", fields[i].get("question_2", "")), texts[i])
        return ratings

    def score(self, instructions, outputs) -> torch.Tensor:
        _check_lengths(instructions, outputs)
        fields = [{"question": i if isinstance(i, str) else as_messages(i)[-1]["content"], "answer": o}
                  for i, o in zip(instructions, outputs)]
        return self.grade("single-v1", fields)

    def compare(self, instructions, outputs_a, outputs_b) -> torch.Tensor:
        """P(b better); NaN where a verdict did not parse (in either order when swapping: one order alone
        would bring back the position bias the swap controls), recorded in `unparsed`."""
        _check_lengths(instructions, outputs_a, outputs_b)
        record = self.prompts["pair-v2"]
        questions = [i if isinstance(i, str) else as_messages(i)[-1]["content"] for i in instructions]

        def verdicts(first, second):
            texts = self.generate_fn([self._messages(record, question=q, answer_a=a, answer_b=b)
                                      for q, a, b in zip(questions, first, second)])
            return texts, torch.tensor([parse_verdict(t) for t in texts])

        runs = [("as given", *verdicts(outputs_a, outputs_b))]
        p_b = runs[0][2]
        if self.swap_pairs:  # FastChat's position-bias control: judge both orders and average
            runs.append(("swapped", *verdicts(outputs_b, outputs_a)))
            p_b = (p_b + (1 - runs[1][2])) / 2
        for i in torch.isnan(p_b).nonzero().flatten().tolist():
            failed = [(order, texts[i]) for order, texts, p in runs if math.isnan(float(p[i]))]
            self._record("pair-v2", i, questions[i], failed[0][1], failed_orders=[order for order, _ in failed])
        return p_b

    def __call__(self, prompts, responses) -> Rewards:
        """The judge as a reward: one finite number per item. An unparsed item gets the mean grade of the
        parsed items of this call, so the batch mean (what PPO logs and evaluate_run averages) equals the
        mean over parsed items, as if they were left out; a fixed stand-in grade would pull it toward
        itself. The item's own value then carries no information: it is listed in `unparsed`."""
        start = len(self.unparsed)
        scores = self.score(prompts, responses).float()
        self.check_unparsed(self.unparsed[start:], len(prompts), f"judge {self.name} as a reward")
        parsed = ~torch.isnan(scores)
        if not parsed.all():
            scores = torch.where(parsed, scores, scores[parsed].mean())
        return Rewards(scores=scores).check(len(prompts), f"judge {self.name}")


def judge_agreement(p_b: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of pairs where the judge's side (P(b) > 0.5) matches a 0/1 label; ties count one half."""
    valid = ~torch.isnan(p_b)
    decided = torch.where(p_b[valid] == 0.5, torch.full_like(p_b[valid], 0.5), (p_b[valid] > 0.5).float())
    return float((1 - (decided - labels[valid].float()).abs()).mean()) if valid.any() else math.nan
