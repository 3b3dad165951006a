"""RewardEnsemble: k reward models behind one call that returns every member's reward as [k, batch].

Written here because no maintained library offers reward-model ensembles. Three kinds (Zhang et al.
2024, Alg. 1):

- ``full``: k independent backbones, each with its own head;
- ``linear``: one shared backbone (trained with the heads, or frozen) and k heads, one forward for all;
- ``lora``: a shared, frozen backbone (trained in stage 1 as a linear ensemble) plus one PEFT LoRA
  adapter and head per member. Adapters sit on the top T decoder layers only; the layers below run once
  per batch, then the hidden states are repeated k times and each copy is routed through its member's
  adapter in a single batched pass (PEFT's per-row ``adapter_names``).

A reward is a linear head on the final hidden state of the last non-padding token (AlpacaFarm's
convention), so left, right or no padding give the same rewards.

`forward` returns raw member rewards (what training sees). A trained ensemble also carries each member's
standardisation (rmens.models.standardise), saved in ensemble.json; EnsembleReward applies it before any
rule aggregates the members.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rmens.io import check_writable, refuse_foreign_folder, write_json
from rmens.models.backbone import context_length, load_backbone, load_tokenizer
from rmens.models.config import EnsembleConfig
from rmens.models.standardise import MemberStandardisation
from rmens.seeding import Stream, seed_for

FORMAT = "rmens-ensemble"
# 2: ensemble.json may hold "standardisation" ({"center": [k], "scale": [k], "responses": n}), which every
# use applies. Version 1 (none) still loads, with standardisation None.
FORMAT_VERSION = 2


def last_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, T, H] hidden states -> [N, H] at each row's last attended position (any padding side)."""
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.flip(1).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def is_saved_ensemble(path: Path) -> bool:
    try:
        return json.loads((path / "ensemble.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


# Marks a sibling folder as rmens' own unfinished save, so that a later save may clear it: a folder of the
# same name that a user made is refused instead of deleted.
PARTIAL_MARK = ".rmens-partial"


def check_output_folder(path: str | Path, overwrite: bool = False) -> None:
    """Refuse, before any work, to replace a folder that is neither empty nor a saved ensemble (a user's files),
    a saved ensemble that holds files rmens did not write there, or a `.partial`/`.replaced` sibling that is
    not rmens' own."""
    path = Path(path)
    # A save writes <name>.partial beside the folder and renames it into place: the parent is what is written.
    check_writable(path.parent, "output folder", shown=path)
    hint = "choose another output folder, or pass --overwrite to replace it"
    refuse_foreign_folder(path, overwrite or is_saved_ensemble(path), "a saved rmens ensemble", hint)
    added = [] if overwrite else _added_files(path)
    if added:
        raise FileExistsError(f"{path} holds {', '.join(added[:3])}, which rmens did not write there; {hint}")
    for suffix in (".partial", ".replaced"):
        sibling = path.with_name(path.name + suffix)
        if sibling.exists() and not (is_saved_ensemble(sibling) or (sibling / PARTIAL_MARK).is_file()):
            raise FileExistsError(f"{sibling} exists and is not a folder rmens left while saving; move it away")


def _added_files(path: Path) -> list[str]:
    """Top-level entries of a saved ensemble that its save did not write (saves before the list: none)."""
    try:
        written = json.loads((path / "ensemble.json").read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    return sorted(p.name for p in path.iterdir() if p.name not in written) if isinstance(written, list) else []


def _os_error_code(err: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's own, or the one safetensors' Rust writer puts only in its
    message ("I/O error: No space left on device (os error 28)")."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err))
    return int(found.group(1)) if found else None


def replace_folder(new: Path, path: Path) -> None:
    """Move the complete folder `new` to `path`; an old `path` is set aside first and deleted only after."""
    old = path.with_name(path.name + ".replaced")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    new.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _fp32(tensor: torch.Tensor):
    """Reward heads run in fp32 even under bf16 autocast: a reward rounded to bf16's 3 significant digits
    makes ties among the outputs Best-of-n compares and coarsens the member spread conservative rules use."""
    return torch.autocast(tensor.device.type, enabled=False)


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of a transformers base model (Llama, Mistral, Qwen, GPT-2, NeoX...)."""
    depth = getattr(backbone.config, "num_hidden_layers", None) or getattr(backbone.config, "n_layer", None)
    for name in ("layers", "h", "blocks"):
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList) and (depth is None or len(layers) == depth):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(backbone).__name__}; LoRA ensembles need them")


def _head_row(hidden_size: int, seed: int, member: int) -> torch.Tensor:
    """Member `member`'s initial head weights [hidden], drawn from its own seed."""
    gen = torch.Generator().manual_seed(seed_for(seed, Stream.HEAD, member))
    return torch.randn(hidden_size, generator=gen) / math.sqrt(hidden_size + 1)


def init_heads(hidden_size: int, k: int, seed: int) -> nn.Linear:
    """k reward heads as one Linear(hidden, k); member i's row is drawn from its own seed.

    std = 1/sqrt(hidden + 1) as AlpacaFarm's reward head. Separate seeds are what make the members of a
    linear ensemble differ, and they keep member i's head the same whatever k is.
    """
    return _heads([_head_row(hidden_size, seed, i) for i in range(k)])


def init_member_head(hidden_size: int, seed: int, member: int) -> nn.Linear:
    """Member `member`'s head alone, as Linear(hidden, 1): row `member` of init_heads(hidden, k, seed) for any k
    above `member` (a full ensemble's member trained on its own, rmens.training.members)."""
    return _heads([_head_row(hidden_size, seed, member)])


def _heads(rows: list[torch.Tensor]) -> nn.Linear:
    heads = nn.Linear(rows[0].shape[0], len(rows))
    with torch.no_grad():
        heads.weight.copy_(torch.stack(rows))
        heads.bias.zero_()
    return heads


class RewardEnsemble(nn.Module):
    """Common interface of all kinds: ``forward(input_ids, attention_mask) -> Tensor[k, batch]`` (raw rewards).

    `standardisation`: each member's center and scale (None until calibrated, or for a folder saved before
    they existed); saved and loaded with the ensemble. `saved_at`: the folder it was last saved to or
    loaded from, for messages.
    """

    kind: str = ""

    def __init__(self, config: EnsembleConfig, heads: nn.Linear):
        super().__init__()
        self.config = config
        self.heads = heads
        self.standardisation: MemberStandardisation | None = None
        self.saved_at: Path | None = None

    @property
    def k(self) -> int:
        return self.heads.out_features

    @property
    def hidden_size(self) -> int:
        return self.heads.in_features

    @property
    def max_length(self) -> int:
        """The longest input the backbone accepts."""
        return context_length(self.backbone_config)

    @property
    def backbone_config(self):
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def member_forward(self, member: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One member's rewards [batch], computed on its own: the reference the batched path must match."""
        raise NotImplementedError

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must both be [batch, length]")
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the backbone's context "
                             f"of {self.max_length} tokens; truncate (max_length) first")
        if not bool(attention_mask.any(dim=1).all()):
            raise ValueError("a row of the batch has no attended tokens")

    def _head(self, pooled: torch.Tensor, member: int) -> torch.Tensor:
        with _fp32(pooled):
            return pooled.float() @ self.heads.weight[member].float() + self.heads.bias[member].float()

    def _all_heads(self, pooled: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [k, N], every member's head on the same pooled states."""
        with _fp32(pooled):
            return (pooled.float() @ self.heads.weight.float().T + self.heads.bias.float()).T

    # -- saving -------------------------------------------------------------------------------------
    def save(self, path: str | Path, tokenizer=None, extra: dict[str, object] | None = None,
             overwrite: bool = False) -> Path:
        """Write the ensemble to a folder; written to a temporary sibling and renamed when complete.

        `extra` maps file names to JSON-serialisable objects written alongside (e.g. training metrics).
        An existing saved ensemble is replaced; any other non-empty folder only with `overwrite`.
        """
        path = Path(path)
        check_output_folder(path, overwrite)
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)  # checked above: an unfinished save of rmens, or nothing
        tmp.mkdir(parents=True)
        (tmp / PARTIAL_MARK).touch()
        try:
            self._write(tmp, tokenizer, extra)
        except Exception as err:
            # A full disk or a folder gone read-only: take back what this save wrote (its own marked folder)
            # rather than leave it filling the disk, and say it as the OSError it is.
            shutil.rmtree(tmp, ignore_errors=True)
            code = _os_error_code(err)
            if code is None or isinstance(err, OSError):
                raise
            raise OSError(code, os.strerror(code), str(path)) from err
        (tmp / PARTIAL_MARK).unlink()
        replace_folder(tmp, path)
        self.saved_at = path
        return path

    def _write(self, tmp: Path, tokenizer, extra: dict[str, object] | None) -> None:
        """Every file of a save into the unfinished folder `tmp`, ensemble.json (the list of them) last."""
        self._save_weights(tmp)
        save_file({"weight": self.heads.weight.detach().contiguous().cpu(),
                   "bias": self.heads.bias.detach().contiguous().cpu()}, tmp / "heads.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, "k": self.k,
                "config": self.config.model_dump(mode="json")}
        if self.standardisation is not None:
            meta["standardisation"] = self._checked(self.standardisation).to_json()
        for name, obj in (extra or {}).items():
            write_json(tmp / name, obj)
        # what a later save may replace without asking (the mark goes last: a kill before leaves it marked)
        meta["files"] = sorted([p.name for p in tmp.iterdir() if p.name != PARTIAL_MARK] + ["ensemble.json"])
        write_json(tmp / "ensemble.json", meta)

    def _checked(self, standardisation: MemberStandardisation) -> MemberStandardisation:
        if standardisation.k != self.k:
            raise ValueError(f"a standardisation of {standardisation.k} members does not fit an ensemble of {self.k}")
        return standardisation

    def _save_weights(self, path: Path) -> None:
        raise NotImplementedError

    def parameter_bytes(self) -> int:
        """Bytes of all distinct parameters and buffers held in memory."""
        seen, total = set(), 0
        for tensor in list(self.parameters()) + list(self.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
        return total


class LinearEnsemble(RewardEnsemble):
    """One backbone, k heads: all members from one backbone forward."""

    kind = "linear"

    def __init__(self, config: EnsembleConfig, backbone: nn.Module, heads: nn.Linear):
        super().__init__(config, heads)
        self.backbone = backbone
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)

    @property
    def backbone_config(self):
        return self.backbone.config

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return last_token_states(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._check_inputs(input_ids, attention_mask)
        return self._all_heads(self.pooled(input_ids, attention_mask))

    def member_forward(self, member: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._check_inputs(input_ids, attention_mask)
        return self._head(self.pooled(input_ids, attention_mask), member)

    def _save_weights(self, path: Path) -> None:
        self.backbone.save_pretrained(path / "backbone")


class FullEnsemble(RewardEnsemble):
    """k independent backbones; the expensive reference."""

    kind = "full"

    def __init__(self, config: EnsembleConfig, backbones: list[nn.Module], heads: nn.Linear):
        super().__init__(config, heads)
        if len(backbones) != heads.out_features:
            raise ValueError(f"{len(backbones)} backbones for {heads.out_features} heads")
        self.backbones = nn.ModuleList(backbones)

    @property
    def backbone_config(self):
        return self.backbones[0].config

    def member_forward(self, member: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._check_inputs(input_ids, attention_mask)
        out = self.backbones[member](input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self._head(last_token_states(out.last_hidden_state, attention_mask), member)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.member_forward(i, input_ids, attention_mask) for i in range(self.k)])

    def _save_weights(self, path: Path) -> None:
        for i, backbone in enumerate(self.backbones):
            backbone.save_pretrained(path / "members" / str(i))


def _top_layer_targets(backbone: nn.Module, top_layers: list[nn.Module], names: list[str]) -> list[str]:
    """Full module names of the `names` projections inside the top layers.

    Spelled out because PEFT's `layers_to_transform` pattern expects the layer stack below a prefix
    (e.g. `model.layers`), which a bare base model does not have.
    """
    prefix = {id(module): name for name, module in backbone.named_modules()}
    targets = [f"{prefix[id(layer)]}.{sub}" for layer in top_layers for sub, _ in layer.named_modules()
               if sub and sub.rsplit(".", 1)[-1] in names]
    if not targets:
        raise ValueError(f"no modules named {names} in the top layers of {type(backbone).__name__}")
    return targets


class LoraEnsemble(RewardEnsemble):
    """A frozen shared backbone with one LoRA adapter (top layers) and one head per member."""

    kind = "lora"

    def __init__(self, config: EnsembleConfig, peft_model: nn.Module, heads: nn.Linear, num_top_layers: int):
        super().__init__(config, heads)
        self.peft = peft_model
        self.num_top_layers = num_top_layers
        self.member_names = [f"m{i}" for i in range(heads.out_features)]
        layers = decoder_layers(self.backbone)
        self._top_layers = list(layers)[len(layers) - num_top_layers:]
        from peft.tuners.lora import LoraLayer

        self._lora_layers = [m for layer in self._top_layers for m in layer.modules() if isinstance(m, LoraLayer)]
        if not self._lora_layers:
            raise ValueError(f"no LoRA layers matched target_modules={config.lora.target_modules}")

    @classmethod
    def from_backbone(cls, config: EnsembleConfig, backbone: nn.Module, heads: nn.Linear) -> LoraEnsemble:
        """Add k fresh adapters (seeded per member) to the top layers of a trained backbone (stage 2)."""
        from peft import LoraConfig, get_peft_model

        layers = decoder_layers(backbone)
        top = config.lora.num_top_layers(len(layers))
        lora_config = LoraConfig(
            r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
            target_modules=_top_layer_targets(backbone, list(layers)[len(layers) - top:], config.lora.target_modules),
        )
        peft_model = None
        for i in range(heads.out_features):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_for(config.seed, Stream.ADAPTER, i))
                if peft_model is None:
                    peft_model = get_peft_model(backbone, lora_config, adapter_name=f"m{i}")
                else:
                    peft_model.add_adapter(f"m{i}", lora_config)
        ensemble = cls(config, peft_model, heads, top)
        ensemble.set_adapters_trainable(True)
        return ensemble

    @property
    def backbone(self) -> nn.Module:
        return self.peft.base_model.model

    @property
    def backbone_config(self):
        return self.backbone.config

    def set_adapters_trainable(self, flag: bool) -> None:
        # PEFT marks only the active adapter trainable; every member trains at once here.
        for name, param in self.peft.named_parameters():
            param.requires_grad_(flag and "lora_" in name)

    def _expand_hooks(self, batch: int, expand: int) -> list:
        """Repeat the batch `expand` times (member-major) where it enters the top layers."""

        def repeat(value):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value.repeat(expand, *([1] * (value.dim() - 1)))
            if isinstance(value, tuple):
                return tuple(repeat(v) for v in value)
            return value

        def expand_inputs(module, args, kwargs):
            return tuple(repeat(a) for a in args), {key: repeat(v) for key, v in kwargs.items()}

        return [layer.register_forward_pre_hook(expand_inputs, with_kwargs=True) for layer in self._top_layers]

    def _peft_routing_hooks(self, adapter_names: list[str]) -> list:
        """PEFT's own per-row routing: each LoRA layer gets `adapter_names` (one name per row)."""

        def route(module, args, kwargs):
            return args, {**kwargs, "adapter_names": adapter_names}

        return [layer.register_forward_pre_hook(route, with_kwargs=True) for layer in self._lora_layers]

    def _block_lora_hooks(self) -> list:
        """Member-major blocks of rows, member i's adapter on block i, as two batched matmuls per layer.

        PEFT's per-row routing gathers and scatters the rows of each adapter (copies sized like the
        activations); with rows already grouped by member, a view and torch.bmm over the stacked adapter
        weights compute the same sum without copies. PEFT still owns the adapters (creation, init,
        saving, loading); `member_forward`, which uses PEFT's routing, is the reference this must match.
        """
        names, k = self.member_names, self.k

        def add_lora(module, args, output):
            x = args[0]
            rows = x.reshape(k, -1, x.shape[-1])
            if any(not isinstance(module.lora_dropout[n], nn.Identity) for n in names):
                rows = torch.stack([module.lora_dropout[n](rows[i]) for i, n in enumerate(names)])
            a = torch.stack([module.lora_A[n].weight for n in names])  # [k, r, in]
            b = torch.stack([module.lora_B[n].weight for n in names])  # [k, out, r]
            scale = torch.tensor([module.scaling[n] for n in names], dtype=rows.dtype, device=rows.device)
            delta = torch.bmm(torch.bmm(rows.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2))
            return output + (delta * scale.view(k, 1, 1)).reshape(output.shape).to(output.dtype)

        return [layer.register_forward_hook(add_lora) for layer in self._lora_layers]

    @contextlib.contextmanager
    def _hooks(self, handles: list, base_only: bool = False) -> Iterator[None]:
        # base_only: the LoRA layers compute their base projection alone (PEFT's adapter switch, set
        # directly: its public toggle also freezes the adapters, which would stop training).
        previous = [layer._disable_adapters for layer in self._lora_layers]
        try:
            if base_only:
                for layer in self._lora_layers:
                    layer._disable_adapters = True
            yield
        finally:
            for layer, flag in zip(self._lora_layers, previous):
                layer._disable_adapters = flag
            for handle in handles:
                handle.remove()

    def _last_hidden(self, input_ids, attention_mask) -> torch.Tensor:
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, routing: str = "blocks") -> torch.Tensor:
        """All members: lower layers once, top layers on k member-major copies of the batch.

        routing='blocks' (default) applies the adapters block-wise with batched matmuls; routing='peft'
        uses PEFT's per-row adapter_names routing on the same expanded batch.
        """
        self._check_inputs(input_ids, attention_mask)
        batch = input_ids.shape[0]
        handles = self._expand_hooks(batch, self.k) if self.k > 1 else []
        if routing == "blocks":
            handles += self._block_lora_hooks()
        elif routing == "peft":
            handles += self._peft_routing_hooks([n for n in self.member_names for _ in range(batch)])
        else:
            raise ValueError(f"routing must be 'blocks' or 'peft', got {routing!r}")
        with self._hooks(handles, base_only=routing == "blocks"):
            hidden = self._last_hidden(input_ids, attention_mask)
        pooled = last_token_states(hidden, attention_mask.repeat(self.k, 1)).view(self.k, batch, -1)
        with _fp32(pooled):
            rewards = torch.einsum("kbh,kh->kb", pooled.float(), self.heads.weight.float())
            return rewards + self.heads.bias.float()[:, None]

    def member_forward(self, member: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._check_inputs(input_ids, attention_mask)
        with self._hooks(self._peft_routing_hooks([self.member_names[member]] * input_ids.shape[0])):
            hidden = self._last_hidden(input_ids, attention_mask)
        return self._head(last_token_states(hidden, attention_mask), member)

    def _save_weights(self, path: Path) -> None:
        # The backbone is saved without the injected LoRA layers, as a plain transformers folder.
        plain = {key.replace(".base_layer.", "."): value for key, value in self.backbone.state_dict().items()
                 if "lora_" not in key}
        self.backbone.save_pretrained(path / "backbone", state_dict=plain)
        self.peft.save_pretrained(path / "adapters")
        write_json(path / "adapters" / "layout.json", {"num_top_layers": self.num_top_layers}, indent=None)


# -- building and loading ---------------------------------------------------------------------------

def build_ensemble(config: EnsembleConfig, dtype: torch.dtype = torch.float32) -> RewardEnsemble:
    """A fresh, untrained ensemble. For kind 'lora' this is stage 1: a linear ensemble whose trained
    backbone `to_lora` later freezes under adapters."""
    backbone = load_backbone(config.backbone, dtype)
    heads = init_heads(backbone.config.hidden_size, config.k, config.seed).to(dtype)
    if config.kind == "full":
        backbones = [backbone] + [load_backbone(config.backbone, dtype) for _ in range(config.k - 1)]
        return FullEnsemble(config, backbones, heads)
    return LinearEnsemble(config, backbone, heads)


def to_lora(stage1: LinearEnsemble, config: EnsembleConfig) -> LoraEnsemble:
    """Stage 2 of the paper's LoRA recipe: freeze the stage-1 backbone, keep its heads, add adapters."""
    if not isinstance(stage1, LinearEnsemble):
        raise TypeError("the LoRA stage starts from a linear ensemble (stage 1)")
    backbone = stage1.backbone
    backbone.requires_grad_(False)
    return LoraEnsemble.from_backbone(config, backbone, stage1.heads)


def read_meta(path: str | Path) -> dict:
    """The checked contents of a saved ensemble's ensemble.json (any version up to FORMAT_VERSION)."""
    path = Path(path)
    meta_file = path / "ensemble.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved ensemble (no ensemble.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: not an rmens ensemble (format={meta.get('format')!r})")
    if meta.get("version", 1) > FORMAT_VERSION:
        raise ValueError(f"{meta_file}: format version {meta['version']} is newer than this rmens reads "
                         f"({FORMAT_VERSION}); upgrade rmens")
    return meta


def read_standardisation(path: str | Path) -> MemberStandardisation | None:
    """The member standardisation saved in a folder's ensemble.json; None when it has none (version 1)."""
    meta = read_meta(path)
    if "standardisation" not in meta:
        return None
    return MemberStandardisation.from_json(meta["standardisation"], f"{Path(path) / 'ensemble.json'}: standardisation")


def write_standardisation(path: str | Path, standardisation: MemberStandardisation) -> None:
    """Store `standardisation` in a saved ensemble's ensemble.json in place (the rest of the folder unchanged).

    Written to a temporary file beside it and renamed over it, so a reader sees the old or the new file,
    never a partial one. The file becomes FORMAT_VERSION, which it now satisfies.
    """
    meta_file = Path(path) / "ensemble.json"
    meta = read_meta(path)
    if standardisation.k != meta["k"]:
        raise ValueError(f"{meta_file}: a standardisation of {standardisation.k} members does not fit k={meta['k']}")
    meta.update(version=FORMAT_VERSION, standardisation=standardisation.to_json())
    fd, tmp = tempfile.mkstemp(prefix=".ensemble.", suffix=".json.tmp", dir=meta_file.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(meta, indent=2))
        os.chmod(tmp, meta_file.stat().st_mode & 0o777)  # mkstemp's file is private; keep the old permissions
        os.replace(tmp, meta_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_ensemble(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a saved ensemble folder -> (ensemble, tokenizer or None). Scores reproduce exactly.

    A folder saved without member standardisation (format version 1) loads with `standardisation` None.
    """
    path = Path(path)
    meta_file = path / "ensemble.json"
    meta = read_meta(path)
    config = EnsembleConfig.model_validate(meta["config"])
    state = load_file(path / "heads.safetensors")
    heads = nn.Linear(state["weight"].shape[1], state["weight"].shape[0]).to(dtype)
    heads.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    kind = meta["kind"]
    if kind == "full":
        backbones = [load_backbone(str(path / "members" / str(i)), dtype) for i in range(meta["k"])]
        ensemble: RewardEnsemble = FullEnsemble(config, backbones, heads)
    elif kind == "linear":
        ensemble = LinearEnsemble(config, load_backbone(str(path / "backbone"), dtype), heads)
    elif kind == "lora":
        from peft import PeftModel

        backbone = load_backbone(str(path / "backbone"), dtype)
        names = [f"m{i}" for i in range(meta["k"])]
        peft_model = PeftModel.from_pretrained(backbone, str(path / "adapters" / names[0]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(path / "adapters" / name), adapter_name=name)
        layout = json.loads((path / "adapters" / "layout.json").read_text())
        ensemble = LoraEnsemble(config, peft_model, heads, layout["num_top_layers"])
        ensemble.set_adapters_trainable(False)
    else:
        raise ValueError(f"{meta_file}: unknown ensemble kind {kind!r}")
    if "standardisation" in meta:
        where = f"{meta_file}: standardisation"
        ensemble.standardisation = MemberStandardisation.from_json(meta["standardisation"], where)
        if ensemble.standardisation.k != ensemble.k:
            raise ValueError(f"{where} has {ensemble.standardisation.k} members, the ensemble {ensemble.k}")
    ensemble.saved_at = path
    tokenizer = load_tokenizer(str(path / "tokenizer")) if (path / "tokenizer").is_dir() else None
    return ensemble.eval(), tokenizer
