"""Batched sampling from a causal LM with its chat template, for Best-of-n and PPO rollouts.

Uses transformers' `generate` (KV cache, temperature, top-p, EOS stopping); the prompt goes through
the same chat-template rendering as the reward models' training pairs. Each batch is seeded from
(seed, batch index), so the samples do not depend on what ran before in the process.

`open_sampler` gives the sampler of a generation config's backend: this module's `generate` on a policy
loaded here (hf), or a vLLM engine in its own environment (vllm, rmens.vllm_engine), behind one signature.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from rmens.data.encoding import Prompt, render_prompt
from rmens.data.schema import DataError
from rmens.generation_config import GenerationConfig
from rmens.models.backbone import context_length
from rmens.seeding import Stream, seed_for


@dataclass
class Samples:
    """Generated responses, aligned with their prompts."""

    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # up to and including the first EOS, if one was produced
    texts: list[str]
    finished: list[bool]  # the response ended with EOS rather than running out of tokens

    def __len__(self) -> int:
        return len(self.prompts)


class Sampler(Protocol):
    """Sample one response per prompt, as `generate` does for a policy bound to it (open_sampler)."""

    def __call__(self, prompts: list[Prompt], cfg: GenerationConfig, *, stream: Stream = Stream.SAMPLE,
                 indices: tuple[int, ...] = (), progress: bool = False) -> Samples: ...


@contextmanager
def open_sampler(model: str, cfg: GenerationConfig) -> Iterator[Sampler]:
    """The sampler of `model` (an alias, folder or hub id) under cfg.backend, for the life of the block."""
    from rmens.models.backbone import load_policy, load_tokenizer

    tokenizer = load_tokenizer(model, padding_side="left")
    if cfg.backend == "vllm":
        from rmens.vllm_engine import VllmEngine

        with VllmEngine(model, cfg.vllm) as engine:
            yield functools.partial(engine.generate, tokenizer)
    else:
        yield functools.partial(generate, load_policy(model), tokenizer)


def eos_ids(policy, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token id that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    return stop_ids(tokenizer, getattr(getattr(policy, "generation_config", None), "eos_token_id", None))


def eos_ids_of_model(model: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """eos_ids of a model (alias, folder or id) without loading its weights: from its generation_config.json,
    else its config.json."""
    from transformers import AutoConfig
    from transformers import GenerationConfig as HFGenerationConfig

    from rmens.models.backbone import resolve_model

    folder = resolve_model(model)
    try:
        configured = HFGenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:  # no generation_config.json: the model config's EOS, as transformers falls back to
        configured = getattr(AutoConfig.from_pretrained(folder), "eos_token_id", None)
    return stop_ids(tokenizer, configured)


def stop_ids(tokenizer: PreTrainedTokenizerBase, configured: int | list[int] | None) -> list[int]:
    ids = {tokenizer.eos_token_id}
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    ids.discard(None)
    if not ids:
        raise ValueError("the policy's tokenizer has no EOS token; generation could never stop early")
    return sorted(ids)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], max_new_tokens: int,
                   context: int) -> list[list[int]]:
    """Prompts (a user message, or a whole conversation as chat messages) -> template token ids."""
    if not prompts:
        raise DataError("the prompt list is empty")
    encoded = []
    for index, prompt in enumerate(prompts):
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise DataError(f"prompt {index} is empty")
        ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        if len(ids) + max_new_tokens > context:
            raise DataError(f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                            f"the policy's context of {context} tokens")
        encoded.append(ids)
    return encoded


def prompts_that_fit(policy: str, prompts: list[str], max_new_tokens: int) -> tuple[list[str], int]:
    """The prompts whose chat-template tokens leave room for `max_new_tokens` in the policy's context, and
    how many were left out (for prompt sets drawn from data rather than written for this policy)."""
    from rmens.models.backbone import load_tokenizer, model_context

    tokenizer = load_tokenizer(policy)
    room = model_context(policy) - max_new_tokens
    lengths = tokenizer([render_prompt(tokenizer, p) for p in prompts], add_special_tokens=False,
                        verbose=False)["input_ids"]
    kept = [prompt for prompt, ids in zip(prompts, lengths) if len(ids) <= room]
    return kept, len(prompts) - len(kept)


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(tokens: list[int], stop: set[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(tokens):
        if token in stop:
            return tokens[: position + 1], True
    return tokens, False


@torch.no_grad()
def generate(policy, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], cfg: GenerationConfig,
             *, stream: Stream = Stream.SAMPLE, indices: tuple[int, ...] = (), progress: bool = False) -> Samples:
    """Sample one response per prompt (repeat prompts for several samples each); batch b draws from the
    seed of (cfg.seed, stream, *indices, b)."""
    prompt_ids = encode_prompts(tokenizer, prompts, cfg.max_new_tokens, context_length(policy.config))
    stop = eos_ids(policy, tokenizer)
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    generated: list[list[int]] = []
    starts = range(0, len(prompts), cfg.batch_size)
    for batch_index, start in enumerate(tqdm(starts, desc="generate", disable=not progress)):
        chunk = prompt_ids[start: start + cfg.batch_size]
        ids, mask = left_pad(chunk, tokenizer.pad_token_id, device)
        torch.manual_seed(seed_for(cfg.seed, stream, *indices, batch_index))
        sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0} \
            if cfg.do_sample else {"do_sample": False}
        out = policy.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens, eos_token_id=stop,
            pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling,
        )
        generated.extend(out[:, ids.shape[1]:].tolist())
    policy.train(was_training)
    return samples_from_tokens(tokenizer, list(prompts), prompt_ids, generated, stop)


def samples_from_tokens(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], prompt_ids: list[list[int]],
                        generated: list[list[int]], stop: list[int]) -> Samples:
    """Samples from each prompt's generated token ids (cut after the first stop token), decoded here."""
    cut = [cut_at_eos(tokens, set(stop)) for tokens in generated]
    responses = [tokens for tokens, _ in cut]
    finished = [done for _, done in cut]
    texts = [tokenizer.decode(r[:-1] if f else r, skip_special_tokens=True) for r, f in zip(responses, finished)]
    return Samples(prompts, prompt_ids, responses, texts, finished)
