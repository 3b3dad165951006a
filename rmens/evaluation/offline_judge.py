"""The offline stand-in for GPT-4: a reward model trained on many more AlpacaEval judgements than any
ensemble under test, and its agreement with GPT-4 on pairs of instructions it never saw.

The AE judgements are strongly length-biased (the longer output wins 84-87% of decided pairs), so the
agreement is also reported on the pairs where the longer output lost, next to the length rule.
"""

from __future__ import annotations

from rmens.data.schema import PreferencePair
from rmens.data.splits import split_by_instruction
from rmens.evaluation.rm_metrics import pairwise_accuracy
from rmens.reward import RewardFn

JUDGE_SALT = "offline-judge"


def judge_split(pairs: list[PreferencePair], held_out_fraction: float = 0.2):
    """(judge training pairs, held-out pairs): by instruction, with a salt of its own."""
    return split_by_instruction(pairs, held_out_fraction, salt=JUDGE_SALT)


def length_rule_accuracy(pairs: list[PreferencePair]) -> float:
    """Accuracy of "the longer response wins" (ties count one half)."""
    import torch

    margins = torch.tensor([float(len(p.chosen) - len(p.rejected)) for p in pairs])
    return pairwise_accuracy(margins)


def agreement_report(judge: RewardFn, pairs: list[PreferencePair]) -> dict:
    """Agreement of a reward judge with the pairs' labels (GPT-4's verdicts), overall and where the longer lost."""
    import torch

    prompts = [p.prompt for p in pairs]
    chosen = judge(prompts, [p.chosen for p in pairs]).scores
    rejected = judge(prompts, [p.rejected for p in pairs]).scores
    margins = (chosen - rejected).float()
    longer_lost = torch.tensor([len(p.chosen) < len(p.rejected) for p in pairs])
    return {
        "n_pairs": len(pairs),
        "agreement": pairwise_accuracy(margins),
        "n_longer_lost": int(longer_lost.sum()),
        "agreement_longer_lost": pairwise_accuracy(margins[longer_lost]) if longer_lost.any() else float("nan"),
        "length_rule_agreement": length_rule_accuracy(pairs),
    }
