"""The offline stand-in for GPT-4: a reward model trained on many more AlpacaEval judgements than any
ensemble under test, and its agreement with GPT-4 on pairs of instructions it never saw.

The AE judgements are strongly length-biased (the longer output wins 84-87% of decided pairs), so the
agreement is also reported on the pairs where the longer output lost, next to the length rule.
"""

from __future__ import annotations

from rmens.data.schema import PreferencePair
from rmens.data.splits import split_by_instruction
from rmens.evaluation.rm_metrics import length_metrics, pairwise_accuracy
from rmens.reward import RewardFn

JUDGE_SALT = "offline-judge"


def judge_split(pairs: list[PreferencePair], held_out_fraction: float = 0.2):
    """(judge training pairs, held-out pairs): by instruction, with a salt of its own."""
    return split_by_instruction(pairs, held_out_fraction, salt=JUDGE_SALT)


def _lengths(pairs: list[PreferencePair]):
    import torch

    return torch.tensor([len(p.chosen) for p in pairs]), torch.tensor([len(p.rejected) for p in pairs])


def length_rule_accuracy(pairs: list[PreferencePair]) -> float:
    """Accuracy of "the longer response wins" (ties count one half)."""
    chosen, rejected = _lengths(pairs)
    return pairwise_accuracy((chosen - rejected).double())


def agreement_report(judge: RewardFn, pairs: list[PreferencePair]) -> dict:
    """Agreement of a reward judge with the pairs' labels (GPT-4's verdicts), overall and where the longer lost."""
    prompts = [p.prompt for p in pairs]
    margins = (judge(prompts, [p.chosen for p in pairs]).scores - judge(prompts, [p.rejected for p in pairs]).scores)
    by_length = length_metrics(margins.float(), *_lengths(pairs))
    return {
        "n_pairs": len(pairs),
        "agreement": pairwise_accuracy(margins.float()),
        "n_longer_lost": by_length["n_longer_lost"],
        "agreement_longer_lost": by_length["accuracy_longer_lost"],
        "length_rule_agreement": by_length["length_rule_accuracy"],
    }
