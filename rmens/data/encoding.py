"""Turning (prompt, response) text into token ids the way every stage agrees on.

The prompt is rendered with the tokenizer's chat template (user turn plus the generation prompt) and
the response with the rest of the template, so a reward model sees policy samples exactly as it saw
training pairs. When a pair is too long, the prompt gives way first (its oldest tokens are dropped),
then the response's tail, so that the response (where the reward is read) is never cut away.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Union

import torch
from transformers import PreTrainedTokenizerBase

from rmens.data.schema import DataError, PreferencePair

# A prompt is one user message, or a conversation so far as chat messages ending with a user turn
# (MT-Bench's second turn).
Prompt = Union[str, list[dict[str, str]]]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The prompt as a chat: template text up to and including the assistant header."""
    return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)


def render_response(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, response: str) -> str:
    """The response as the template completes it (including the end-of-turn marker)."""
    head = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        as_messages(prompt) + [{"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(head):
        # Templates that rewrite earlier turns cannot be split into prompt + response text.
        raise ValueError("the chat template does not render the prompt as a prefix of the full conversation")
    return full[len(head):]


@dataclass
class PairEncoder:
    """Encodes prompts, responses and preference pairs to at most `max_length` tokens."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int
    max_prompt_length: int | None = None

    def __post_init__(self) -> None:
        if self.max_prompt_length is None:
            self.max_prompt_length = self.max_length // 2

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        return self.ids(render_prompt(self.tokenizer, self._cut_prompt(prompt)))

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """Token ids of prompt + response, truncated so that the response stays visible."""
        return self.join(self.prompt_ids(prompt), self.response_ids(prompt, response))

    def response_ids(self, prompt: Prompt, response: str) -> list[int]:
        return self.ids(render_response(self.tokenizer, self._cut_prompt(prompt), self._cut(response)))

    def _cut(self, response: str) -> str:
        """The response cut far beyond the last token that can be kept (no token decodes to more characters
        than its vocabulary string), so a huge response costs no more to tokenise than a long one."""
        return response[: self.max_length * self._max_token_chars]

    def _cut_prompt(self, prompt: Prompt) -> Prompt:
        """The prompt's tail, cut as `_cut` cuts a response's head: `join` keeps a prompt's last tokens, so a
        huge prompt costs no more to render and tokenise than a long one (each message of a conversation is
        cut alike)."""
        limit = self.max_length * self._max_token_chars
        if isinstance(prompt, str):
            return prompt[-limit:]
        return [{**message, "content": message["content"][-limit:]} for message in prompt]

    def join(self, prompt_ids: list[int], response_ids: list[int]) -> list[int]:
        total = len(prompt_ids) + len(response_ids)
        if total <= self.max_length:
            return prompt_ids + response_ids
        keep_prompt = min(len(prompt_ids), max(self.max_prompt_length, self.max_length - len(response_ids)))
        keep_response = self.max_length - keep_prompt
        return prompt_ids[len(prompt_ids) - keep_prompt:] + response_ids[:keep_response]

    def encode_batch(self, prompts: list[Prompt], responses: list[str]) -> list[list[int]]:
        """`encode` for many (prompt, response) at once, the same ids: each distinct prompt is rendered and
        tokenised once, and all texts go through the fast tokenizer in one batched call.

        Prompts and responses are cut first, as in `encode` (`_cut_prompt`, `_cut`).
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        keys = [prompt if isinstance(prompt, str) else repr(prompt) for prompt in prompts]
        unique = dict(zip(keys, prompts))
        cut = {key: self._cut_prompt(prompt) for key, prompt in unique.items()}
        prompt_ids = dict(zip(unique, self._tokenize([render_prompt(self.tokenizer, p) for p in cut.values()])))
        texts = [render_response(self.tokenizer, cut[key], self._cut(r)) for key, r in zip(keys, responses)]
        return [self.join(prompt_ids[key], ids) for key, ids in zip(keys, self._tokenize(texts))]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        # verbose=False: texts longer than the model are expected here; `join` truncates them.
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    @functools.cached_property
    def _max_token_chars(self) -> int:
        # Two characters of slack per token on top of the longest token: a cut inside a word can re-merge
        # the tokens just before it, and the slack keeps such a cut far beyond the tokens that are kept.
        return max(len(token) for token in self.tokenizer.get_vocab()) + 2

    def encode_pair(self, pair: PreferencePair) -> tuple[list[int], list[int]]:
        prompt_ids = self.prompt_ids(pair.prompt)
        return (self.join(prompt_ids, self.response_ids(pair.prompt, pair.chosen)),
                self.join(prompt_ids, self.response_ids(pair.prompt, pair.rejected)))


def pad_batch(sequences: list[list[int]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad token id lists into input_ids and attention_mask tensors."""
    if not sequences:
        raise DataError("cannot pad an empty batch")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            raise DataError(f"sequence {row} of the batch is empty")
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


@dataclass
class EncodedPairs(torch.utils.data.Dataset):
    """Pre-tokenised pairs with their BT targets and per-member weights, for a DataLoader."""

    chosen: list[list[int]]
    rejected: list[list[int]]
    targets: torch.Tensor  # [n] probability that chosen wins
    member_weights: torch.Tensor  # [k, n]

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: int) -> int:
        return index


def encode_pairs(encoder: PairEncoder, pairs: list[PreferencePair], member_weights: torch.Tensor) -> EncodedPairs:
    chosen, rejected = [], []
    for pair in pairs:
        c, r = encoder.encode_pair(pair)
        chosen.append(c)
        rejected.append(r)
    targets = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    return EncodedPairs(chosen, rejected, targets, member_weights)


class PairCollator:
    """Batches pair indices into one tensor: chosen rows first, then rejected rows.

    Scoring chosen and rejected in the same forward halves the number of backbone calls.
    """

    def __init__(self, data: EncodedPairs, pad_id: int):
        self.data = data
        self.pad_id = pad_id

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        seqs = [self.data.chosen[i] for i in indices] + [self.data.rejected[i] for i in indices]
        batch = pad_batch(seqs, self.pad_id)
        index = torch.tensor(indices, dtype=torch.long)
        batch["index"] = index
        batch["targets"] = self.data.targets[index]
        batch["member_weights"] = self.data.member_weights[:, index]
        return batch
