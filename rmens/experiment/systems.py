"""Which generating systems are one system, and which are held out of training.

Holding out a system by its exact name is not enough: AlpacaEval names one model several ways (`gpt4` and
`gpt4_0314`), ships length-prompted variants (`alpaca-7b_concise`), reranked outputs of a model
(`pairrm-tulu-2-70b` is Best-of-16 of `tulu-2-dpo-70b` under PairRM), and a developer's sizes and versions
of one line (`llama-2-{7,13,70}b-chat-hf`). A reward model trained on one of these and judged on another
could gain by recognising the line. So systems are held out by family: one developer's line of one model,
written below as a pattern over AlpacaEval's generator names. A name no pattern matches is its own
family, after dropping a `_concise` or `_verbose` suffix. Third-party fine-tunes of a base model (a
Mistral-7B tuned by another group) are not the base model's family: they share weights, not outputs or
data, and grouping by base model would put most of the list in two families.

Written here because no maintained library groups AlpacaEval's generators; the table was checked against
every generator name in the AE1 and AE2 annotation files (tests/test_experiment.py).
"""

from __future__ import annotations

import re

from rmens.data.splits import unit_hash

FAMILIES: dict[str, str] = {
    "openai": r"^(gpt4|gpt-4|gpt-3\.5|gpt35|chatgpt|text_davinci)",  # the AE1 and AE2 references' line
    "anthropic-claude": r"^claude(-|$)",  # not claude2-alpaca-13b, another group's distillation
    "meta-llama-2-chat": r"^llama-2-\d+b-chat",
    "tulu-2": r"^(pairrm-)?tulu-2",
    "zephyr": r"^(pairrm-)?zephyr",
    "vicuna": r"^vicuna",
    "alpaca": r"^alpaca-(7b|farm)",  # Alpaca 7B and AlpacaFarm's PPO models of it
    "phi-2": r"^phi-2",
    "minichat": r"^minichat",
    "evo": r"^evo-",
    "ultralm": r"^ultralm",
    "recycled-wizardlm": r"^recycled-wizardlm",
    "openbuddy": r"^openbuddy",
    "fusechat": r"^fusechat",
    "oasst": r"^oasst",
    "gemma": r"^gemma",
    "falcon-instruct": r"^falcon-\d+b-instruct",
    "mistral-ai": r"^(mistral-medium|mixtral)",
}
_PATTERNS = [(family, re.compile(pattern, re.IGNORECASE)) for family, pattern in FAMILIES.items()]


def system_family(generator: str) -> str:
    """The family a generator belongs to (its own name, less a length-style suffix, when none matches)."""
    for family, pattern in _PATTERNS:
        if pattern.search(generator):
            return family
    return re.sub(r"_(concise|verbose)$", "", generator)


def held_out_families(systems: dict[str, set[str]], always_train: set[str], fraction: float, salt: str) -> set[str]:
    """The families held out, from the systems that answer in each judge set (`systems`: judge set -> names).

    Families are taken whole, in the order of a hash of their name (salted), each one held out while a judge
    set it answers in holds fewer than `fraction` of that set's candidate systems. Counting systems per judge
    set rather than families keeps every set's pools the same size whatever the hash draws (many systems
    answer in one set only); families of `always_train` systems (the references) are never candidates."""
    excluded = {system_family(g) for g in always_train}
    members: dict[str, dict[str, int]] = {}  # family -> judge set -> its systems there
    for judge, names in systems.items():
        for family in (system_family(g) for g in names):
            if family not in excluded:
                members.setdefault(family, {}).setdefault(judge, 0)
                members[family][judge] += 1
    target = {judge: round(fraction * sum(m.get(judge, 0) for m in members.values())) for judge in systems}
    held, count = set(), dict.fromkeys(systems, 0)
    for family in sorted(members, key=lambda name: unit_hash(name, salt)):
        if any(count[judge] < target[judge] for judge in members[family]):
            held.add(family)
            for judge, n in members[family].items():
                count[judge] += n
    return held
