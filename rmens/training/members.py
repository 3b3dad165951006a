"""A full ensemble trained as k members on their own, then assembled.

A full ensemble's members share no parameters, so each is trained alone and they may run on k devices at
once (the pipeline's and the experiment's member steps). Member i is a one-backbone model under member i's
head (row i of the ensemble's init_heads), trained on member i's per-pair weights (row i of
member_weights for k members) in the ensemble's data order, with its own gradient clipping, optimizer,
schedule and standardisation. The global generators (dropout) are seeded by (training seed, i) alone, so
member i comes out the same whichever members were trained before it, in this process or in another.

`assemble` stacks k trained members into the FullEnsemble that rmens.models.ensemble saves and loads as
before: their backbones, their heads in member order, their standardisations side by side, evaluated on
the validation pairs as one ensemble. `train_ensemble` of a full ensemble runs exactly `train_member` for
each member in turn and then `assemble`, so it equals an ensemble assembled from k member steps, weight for
weight and score for score.

A saved member is a folder: backbone/ (save_pretrained), head.safetensors (its weight row [1, hidden] and
bias [1]), and member.json, written last: its index, the ensemble and training settings it was trained for,
its standardisation, and its steps, wall time, history and the MiB of weights and Adam state it held.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn

from rmens.data.encoding import PairEncoder
from rmens.data.schema import PreferencePair, validate_pairs
from rmens.io import write_json
from rmens.models.backbone import load_backbone, load_tokenizer
from rmens.models.config import EnsembleConfig
from rmens.models.context import check_max_length
from rmens.models.ensemble import FullEnsemble, check_output_folder, init_member_head, replace_folder
from rmens.models.standardise import MemberStandardisation
from rmens.seeding import Stream, seed_for
from rmens.training.config import TrainConfig
from rmens.training.sharding import LaunchConfig
from rmens.training.trainer import (
    EnsembleTrainer,
    LogFn,
    StageResult,
    TrainResult,
    calibrate_members,
    encode_weighted,
    finish_training,
    make_accelerator,
    unsharded,
)

MEMBER_FORMAT = "rmens-member"
MEMBER_FORMAT_VERSION = 1


@dataclass
class TrainedMember:
    """Member `index` of the full ensemble `config`, trained with `train`. `model` is that member alone: a
    FullEnsemble of one backbone under its head, Linear(hidden, 1), with its standardisation (k=1; its config
    is the whole ensemble's). `saved_at`: the folder it was loaded from, for messages."""

    index: int
    config: EnsembleConfig
    train: TrainConfig
    model: FullEnsemble
    stage: StageResult
    saved_at: Path | None = None
    ranks: list[dict] | None = None  # trained sharded: each rank's peak memory (rmens.training.launcher)

    def name(self) -> str:
        return f"member {self.index}" + (f" ({self.saved_at})" if self.saved_at else "")


def check_member(ens_cfg: EnsembleConfig, member: int) -> None:
    if ens_cfg.kind != "full":
        raise ValueError(f"members are trained on their own for kind 'full' only, not {ens_cfg.kind!r}")
    if not 0 <= member < ens_cfg.k:
        raise ValueError(f"member {member} of a full ensemble of k={ens_cfg.k}: its members are 0 to {ens_cfg.k - 1}")


def build_member(ens_cfg: EnsembleConfig, member: int, dtype: torch.dtype = torch.float32) -> FullEnsemble:
    """Member `member` of a fresh full ensemble: the pretrained backbone under that member's head."""
    backbone = load_backbone(ens_cfg.backbone, dtype)
    head = init_member_head(backbone.config.hidden_size, ens_cfg.seed, member).to(dtype)
    return FullEnsemble(ens_cfg, [backbone], head)


def train_member(ens_cfg: EnsembleConfig, cfg: TrainConfig, member: int, train_pairs: list[PreferencePair],
                 val_pairs: list[PreferencePair] | None = None, log_fn: LogFn | None = None,
                 accelerator: Accelerator | None = None, launch: LaunchConfig | None = None) -> TrainedMember:
    """Train member `member` of the full ensemble `ens_cfg` alone and calibrate its standardisation. `val_pairs`,
    if given, score the member every cfg.eval_every steps (val_accuracy_m{member}, val_ece_m{member}).
    `launch`: this process is one rank of a sharded member job (rmens.training.launcher); rank 0 returns the
    gathered member, the others their shards."""
    check_member(ens_cfg, member)
    validate_pairs(train_pairs, "training pairs")
    check_max_length(ens_cfg.backbone, ens_cfg.max_length)
    acc = accelerator or make_accelerator(cfg)
    set_seed(seed_for(cfg.seed, Stream.MEMBER_TRAINING, member) % 2**32)  # numpy's global generator takes 32 bits
    tokenizer = load_tokenizer(ens_cfg.backbone)
    encoder = PairEncoder(tokenizer, ens_cfg.max_length, ens_cfg.max_prompt_length)
    val = encode_weighted(encoder, ens_cfg, val_pairs, 0, member) if val_pairs else None
    trainer = EnsembleTrainer(acc, build_member(ens_cfg, member), cfg, tokenizer.pad_token_id, lr=cfg.lr,
                              schedule=cfg.schedule, stage=f"m{member}", log_fn=log_fn, member=member, launch=launch)
    stage = trainer.train(encode_weighted(encoder, ens_cfg, train_pairs, 1, member), val)
    # The accelerator holds what it prepared (the optimizer with its Adam moments) until told to forget it:
    # the next member trained with the same accelerator would otherwise hold this one's too.
    acc.free_memory()
    model = trainer.ensemble
    model.standardisation = calibrate_members(model, tokenizer, train_pairs, cfg)
    if launch is not None:
        model = unsharded(model, lambda: build_member(ens_cfg, member))
    return TrainedMember(member, ens_cfg, cfg, model, stage)


def save_member(member: TrainedMember, folder: str | Path) -> Path:
    """Write a trained member to `folder` (see the module docstring): into a sibling `.partial` folder, moved into
    place when complete, so that a folder holding member.json is a whole member (an older one at `folder` is
    replaced only then)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # rmens' own unfinished save of this member
    tmp.mkdir(parents=True)
    model = member.model
    model.backbones[0].save_pretrained(tmp / "backbone")
    save_file({"weight": model.heads.weight.detach().contiguous().cpu(),
               "bias": model.heads.bias.detach().contiguous().cpu()}, tmp / "head.safetensors")
    write_json(tmp / "member.json", {
        "format": MEMBER_FORMAT, "version": MEMBER_FORMAT_VERSION, "member": member.index,
        "ensemble": member.config.model_dump(mode="json"), "train": member.train.model_dump(mode="json"),
        "standardisation": model.standardisation.to_json(), "steps": member.stage.steps,
        "wall_time": member.stage.wall_time, "history": member.stage.history, "state_mib": member.stage.state_mib})
    replace_folder(tmp, folder)
    return folder


def load_member(folder: str | Path, dtype: torch.dtype = torch.float32) -> TrainedMember:
    """A member that save_member wrote."""
    folder = Path(folder)
    meta_file = folder / "member.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder} is not a trained member of a full ensemble (no member.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != MEMBER_FORMAT or meta.get("version", 0) > MEMBER_FORMAT_VERSION:
        raise ValueError(f"{meta_file}: not a member this rmens reads (format {meta.get('format')!r}, "
                         f"version {meta.get('version')!r})")
    config = EnsembleConfig.model_validate(meta["ensemble"])
    state = load_file(folder / "head.safetensors")
    head = nn.Linear(state["weight"].shape[1], 1).to(dtype)
    head.load_state_dict({key: value.to(dtype) for key, value in state.items()})
    model = FullEnsemble(config, [load_backbone(str(folder / "backbone"), dtype)], head)
    model.standardisation = MemberStandardisation.from_json(meta["standardisation"], f"{meta_file}: standardisation")
    stage = StageResult(steps=meta["steps"], wall_time=meta["wall_time"], history=meta["history"],
                        state_mib=meta.get("state_mib", 0.0))
    return TrainedMember(meta["member"], config, TrainConfig.model_validate(meta["train"]), model, stage, folder)


def load_members(folders: list[str | Path], dtype: torch.dtype = torch.float32) -> list[TrainedMember]:
    return [load_member(folder, dtype) for folder in folders]


def _differing(a, b) -> str:
    return ", ".join(name for name in type(a).model_fields if getattr(a, name) != getattr(b, name))


def check_members(ens_cfg: EnsembleConfig, cfg: TrainConfig, members: list[TrainedMember]) -> None:
    """Refuse, naming the first member that does not fit, members that are not the k members of `ens_cfg` in
    order, trained with `cfg`."""
    if len(members) != ens_cfg.k:
        raise ValueError(f"a full ensemble of k={ens_cfg.k} is assembled from {ens_cfg.k} members, got {len(members)}")
    for position, member in enumerate(members):
        if member.index != position:
            raise ValueError(f"{member.name()} was given as member {position}: give the members in order, "
                             f"0 to {ens_cfg.k - 1}")
        if member.config != ens_cfg:
            raise ValueError(f"{member.name()} was trained for another ensemble than the one assembled (it differs "
                             f"in {_differing(member.config, ens_cfg)})")
        if member.train != cfg:
            raise ValueError(f"{member.name()} was trained with other training settings than the ensemble's (it "
                             f"differs in {_differing(member.train, cfg)})")


def assemble(ens_cfg: EnsembleConfig, cfg: TrainConfig, members: list[TrainedMember],
             val_pairs: list[PreferencePair] | None = None, output_dir: str | Path | None = None,
             log_fn: LogFn | None = None, accelerator: Accelerator | None = None, overwrite: bool = False,
             start: float | None = None) -> TrainResult:
    """The full ensemble of its k trained members: their backbones, their heads stacked in member order and
    their standardisations side by side, evaluated on `val_pairs` and saved as train_ensemble saves an
    ensemble; its stages are the members' (m0, m1...). `start`: when the training began (default: now)."""
    start = time.perf_counter() if start is None else start
    check_members(ens_cfg, cfg, members)
    if output_dir is not None:
        check_output_folder(output_dir, overwrite)
    acc = accelerator or make_accelerator(cfg)
    models = [member.model for member in members]
    heads = nn.Linear(models[0].hidden_size, ens_cfg.k).to(models[0].heads.weight.dtype)
    with torch.no_grad():
        heads.weight.copy_(torch.cat([model.heads.weight for model in models]))
        heads.bias.copy_(torch.cat([model.heads.bias for model in models]))
    ensemble = FullEnsemble(ens_cfg, [model.backbones[0] for model in models], heads).to(acc.device)
    ensemble.standardisation = MemberStandardisation.concat([model.standardisation for model in models])
    tokenizer = load_tokenizer(ens_cfg.backbone)
    encoder = PairEncoder(tokenizer, ens_cfg.max_length, ens_cfg.max_prompt_length)
    val = encode_weighted(encoder, ens_cfg, val_pairs, 0) if val_pairs else None
    result = TrainResult(ensemble, None, {}, {f"m{member.index}": member.stage for member in members}, 0.0,
                         per_member=True)
    return finish_training(result, tokenizer, val, val_pairs, cfg, acc, output_dir, log_fn, overwrite, start)
