"""Bradley-Terry training of ensemble members, under accelerate.

Written here because no maintained library trains reward-model ensembles; the loop itself is the
ordinary accelerate pattern (prepare, accumulate, backward, clip, step), so the same code runs on one
CPU process, several processes (``accelerate launch --cpu --num_processes 2``) or several GPUs (DDP).

A linear or LoRA ensemble trains all its members at once: one forward per micro-batch scores chosen and
rejected responses of every member together, the loss is the sum of the members' (weighted) BT losses,
and a single backward trains every member, so a linear ensemble pays for one backbone pass. A full
ensemble's members share no parameters, so each trains on its own (rmens.training.members: its own
gradient clipping, optimizer and schedule) and the k trained members are then assembled.

After training, each member's standardisation (mean 0, sd 1) is calibrated on the responses of a seeded
subset of the training pairs and saved with the ensemble (rmens.models.standardise).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from rmens.data.encoding import EncodedPairs, PairCollator, PairEncoder, encode_pairs
from rmens.data.schema import PreferencePair, validate_pairs
from rmens.data.splits import member_weights, split_by_instruction
from rmens.evaluation.rm_metrics import ensemble_metrics, length_metrics, scalar_metrics
from rmens.models.backbone import load_tokenizer
from rmens.models.config import EnsembleConfig
from rmens.models.context import check_max_length
from rmens.models.ensemble import RewardEnsemble, build_ensemble, check_output_folder, to_lora
from rmens.models.standardise import MemberStandardisation, calibrate, calibration_subset, pair_responses
from rmens.seeding import Stream, seed_for
from rmens.training.config import TrainConfig
from rmens.training.sharding import (
    LaunchConfig,
    full_tensor,
    gather_full_state,
    local_bytes,
    rank_batches,
    shard_ensemble,
)

log = logging.getLogger(__name__)

LogFn = Callable[[int, dict[str, float]], None]


def bradley_terry_loss(member_rewards: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                       center_coef: float = 0.0, real: torch.Tensor | None = None,
                       count: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of all members on one batch laid out as [k, 2B] (chosen rows, then rejected rows).

    Per member: mean over the batch of w * BT negative log-likelihood with soft target t (the
    probability that chosen wins), plus optional centring coef * (r_c + r_r)^2. Dividing by the batch
    size (not by the weights' sum) keeps bootstrap weights unbiased and makes data-parallel gradient
    averaging equal to one large batch. Returns (sum over members, per-member losses [k]).

    A sharded rank's slice of a batch (rmens.training.sharding.rank_batches): `real` [B] marks its pairs (0: a
    row padding a short slice, which counts for nothing), `count` is the batch's pairs over the ranks, so that
    the ranks' average gradient is the whole batch's mean.
    """
    batch = targets.shape[0]
    count = batch if count is None else count
    chosen, rejected = member_rewards[:, :batch], member_rewards[:, batch:]
    margin = chosen - rejected
    nll = -(targets * F.logsigmoid(margin) + (1 - targets) * F.logsigmoid(-margin))
    per_member = (weights * nll).sum(dim=1) / count
    if center_coef:
        centring = (chosen + rejected) ** 2 if real is None else (chosen + rejected) ** 2 * real
        per_member = per_member + center_coef * centring.sum(dim=1) / count
    if not torch.isfinite(per_member).all():
        raise FloatingPointError(f"non-finite training loss per member: {per_member.tolist()}")
    return per_member.sum(), per_member.detach()


@dataclass
class StageResult:
    steps: int
    wall_time: float
    history: list[dict] = field(default_factory=list)
    # MiB of trained weights and optimizer state this process held at the end (a sharded rank: its shards)
    state_mib: float = 0.0


@dataclass
class TrainResult:
    """`stages`: each training phase (train; LoRA: stage1, stage2), or a full ensemble's members (m0, m1...),
    each with its own steps from 1 (`per_member`)."""

    ensemble: RewardEnsemble
    path: Path | None
    metrics: dict
    stages: dict[str, StageResult]
    wall_time: float
    per_member: bool = False
    # A sharded step's ranks, each {"peak_mib": ..., "memory": "cuda" | "rss"}; None in one process.
    ranks: list[dict] | None = None

    @property
    def steps(self) -> int:
        """Optimizer steps on the training's step axis: the phases' one after another; a full ensemble's
        members each take the same number side by side, so one member's."""
        counts = [stage.steps for stage in self.stages.values()]
        return max(counts) if self.per_member else sum(counts)


def training_precision(cfg: TrainConfig) -> str:
    if cfg.precision == "bf16":
        return "bf16"
    if cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


@torch.no_grad()
def score_pairs(model: torch.nn.Module, data: EncodedPairs, pad_id: int, batch_size: int,
                accelerator: Accelerator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Member rewards of every pair -> (chosen [k, n], rejected [k, n]), in the data's order.

    Pairs are batched by length to waste little on padding; with an accelerator each process scores
    its share and the results are gathered.
    """
    order = sorted(range(len(data)), key=lambda i: max(len(data.chosen[i]), len(data.rejected[i])))
    loader = DataLoader(order, batch_size=batch_size, collate_fn=PairCollator(data, pad_id))
    device = next(model.parameters()).device
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader, device_placement=True)
    was_training = model.training
    model.eval()
    parts_c, parts_r, parts_i = [], [], []
    for batch in loader:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        rewards = model(input_ids=ids, attention_mask=mask).float()
        b = ids.shape[0] // 2
        chosen, rejected, index = rewards[:, :b].T, rewards[:, b:].T, batch["index"].to(device)
        if accelerator is not None:
            chosen, rejected, index = accelerator.gather_for_metrics((chosen, rejected, index))
        parts_c.append(chosen.cpu())
        parts_r.append(rejected.cpu())
        parts_i.append(index.cpu())
    model.train(was_training)
    index = torch.cat(parts_i)
    chosen, rejected = torch.empty(len(data), model_k(model)), torch.empty(len(data), model_k(model))
    chosen[index], rejected[index] = torch.cat(parts_c), torch.cat(parts_r)
    return chosen.T.contiguous(), rejected.T.contiguous()


def model_k(model: torch.nn.Module) -> int:
    return getattr(model, "module", model).k


def evaluate_pairs(model, data: EncodedPairs, pad_id: int, batch_size: int, accelerator=None,
                   pairs: list[PreferencePair] | None = None) -> dict:
    """Ensemble metrics of the encoded pairs; given their `pairs`, also the accuracy where the longer
    response (in characters) lost, next to "the longer wins" (decided pairs only)."""
    chosen, rejected = score_pairs(model, data, pad_id, batch_size, accelerator)
    metrics = ensemble_metrics(chosen - rejected, data.targets, member_chosen=chosen)
    decided = [i for i, p in enumerate(pairs or []) if p.weight != 0.5]
    if decided:
        lengths = [torch.tensor([len(getattr(pairs[i], side)) for i in decided]) for side in ("chosen", "rejected")]
        metrics.update(length_metrics((chosen - rejected)[:, decided].mean(dim=0), *lengths))
    return metrics


class EnsembleTrainer:
    """Trains a RewardEnsemble on encoded pairs; one instance per training stage.

    `member`: the ensemble is that member of a full ensemble alone (rmens.training.members), so its metrics
    are named after it: train/loss_m{member}, train/grad_norm_m{member}, val_accuracy_m{member}. train/loss
    is its loss, as every kind's curve has one.
    """

    def __init__(self, accelerator: Accelerator, ensemble: RewardEnsemble, cfg: TrainConfig, pad_id: int,
                 *, lr: float, schedule: str, stage: str, log_fn: LogFn | None = None, step_offset: int = 0,
                 phase: int = 1, member: int | None = None, launch: LaunchConfig | None = None):
        self.accelerator = accelerator
        self.ensemble = ensemble
        self.cfg = cfg
        self.pad_id = pad_id
        self.lr = lr
        self.schedule = schedule
        self.stage = stage
        self.log_fn = log_fn
        self.step_offset = step_offset
        self.phase = phase  # LoRA: 1 = heads on the frozen backbone, 2 = adapters; other kinds: 1
        self.member = member
        self.launch = launch  # set in a rank of a sharded step (rmens.training.sharding): FSDP2, not DDP
        self.members = list(range(ensemble.k)) if member is None else [member]  # who each reward row is
        self.grad_norm_key = "train/grad_norm" if member is None else f"train/grad_norm_m{member}"

    def _loader(self, data: EncodedPairs, epoch: int) -> DataLoader:
        """This epoch's batches, in an order fixed by (seed, phase, epoch) alone.

        The permutation is drawn here rather than by a sampler so that accelerate's sharding (batch i
        to process i mod n) gives every process count the same global batches: 2 processes with batch
        2 see what 1 process with batch 4 sees.
        """
        seed = seed_for(self.cfg.seed, Stream.DATA_ORDER, self.phase, epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
        if self.launch is not None:  # the same batches, each split over the ranks (accelerate would pad the last)
            return rank_batches(order, self.cfg.batch_size, PairCollator(data, self.pad_id), self.accelerator)
        loader = DataLoader(order, batch_size=self.cfg.batch_size, collate_fn=PairCollator(data, self.pad_id))
        return self.accelerator.prepare_data_loader(loader)

    def _val_metrics(self, found: dict) -> dict[str, float]:
        if self.member is None:
            return scalar_metrics(found, "val_")
        # One member's own numbers, named after it; its ensemble's val_* come when the members are assembled.
        return {f"val_{key}_m{self.member}": float(found[key]) for key in ("accuracy", "ece")}

    def _log(self, step: int, metrics: dict[str, float], history: list[dict]) -> None:
        history.append({"step": step, **metrics})
        if self.log_fn is not None and self.accelerator.is_main_process:
            self.log_fn(step, metrics)

    def train(self, data: EncodedPairs, val: EncodedPairs | None) -> StageResult:
        cfg, acc = self.cfg, self.accelerator
        if self.launch is not None:  # before the optimizer sees the parameters: sharding replaces them
            shard_ensemble(self.ensemble, self.launch, acc.autocast() if acc.mixed_precision != "no" else None)
        params = [p for p in self.ensemble.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{self.stage}: the ensemble has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=cfg.weight_decay)
        if self.launch is not None:  # FSDP2 reduces the gradients; accelerate must not wrap it in DDP as well
            model, optimizer = self.ensemble, acc.prepare(optimizer)
        else:
            model, optimizer = acc.prepare(self.ensemble, optimizer)
        loader = self._loader(data, 0)
        steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        # Stepped by hand once per optimizer step (not prepared): accelerate would step a prepared
        # scheduler once per process, which would make the schedule depend on the process count.
        scheduler = get_scheduler(self.schedule, optimizer, num_warmup_steps=round(cfg.warmup_ratio * total),
                                  num_training_steps=total)
        history: list[dict] = []
        bar = tqdm(total=total, desc=f"train {self.stage}", disable=not (cfg.progress and acc.is_main_process))
        start, step, epoch = time.perf_counter(), 0, 0
        model.train()
        while step < total:
            loader = self._loader(data, epoch) if epoch else loader
            for batch in loader:
                with acc.accumulate(model):
                    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    loss, per_member = bradley_terry_loss(rewards.float(), batch["targets"], batch["member_weights"],
                                                          cfg.center_coef, batch.get("real"), batch.get("count"))
                    acc.backward(loss)
                    if not acc.sync_gradients:
                        continue
                    grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                step += 1
                bar.update(1)
                # One vocabulary whatever the kind: every phase logs train/*, on one step axis, with its
                # phase number, so a LoRA ensemble's curve sits on the same chart as a linear one's.
                metrics = {"train/loss": float(acc.reduce(loss.detach(), "mean")),
                           "train/lr": scheduler.get_last_lr()[0], "train/phase": float(self.phase)}
                if grad_norm is not None:
                    metrics[self.grad_norm_key] = float(full_tensor(grad_norm))
                reduced = acc.reduce(per_member, "mean")
                metrics.update({f"train/loss_m{i}": float(v) for i, v in zip(self.members, reduced)})
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                if val is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                    metrics.update(self._val_metrics(evaluate_pairs(model, val, self.pad_id, cfg.eval_batch_size,
                                                                    acc)))
                self._log(self.step_offset + step, metrics, history)
                if step >= total:
                    break
            epoch += 1
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        held = [*params, *(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))]
        self.ensemble = acc.unwrap_model(model)
        return StageResult(steps=step, wall_time=time.perf_counter() - start, history=history,
                           state_mib=sum(local_bytes(t) for t in held) / 2**20)


def calibrate_members(ensemble: RewardEnsemble, tokenizer, pairs: list[PreferencePair],
                      cfg: TrainConfig) -> MemberStandardisation:
    """Each member's standardisation on both responses of up to cfg.calibration_pairs training pairs.

    Every process computes it alike (same seeded pairs, same weights, no collective call), so the
    ensemble each one returns carries it; the main process saves it.
    """
    prompts, responses = pair_responses(calibration_subset(pairs, cfg.calibration_pairs, cfg.seed))
    return calibrate(ensemble, tokenizer, prompts, responses, cfg.eval_batch_size)


def lora_stage_split(pairs: list[PreferencePair], stage1_fraction: float):
    """Stage-1 and stage-2 pairs of the LoRA recipe, disjoint by instruction unless the fraction is 1."""
    if stage1_fraction >= 1.0:
        return pairs, pairs
    stage2, stage1 = split_by_instruction(pairs, stage1_fraction, salt="lora-stage1")
    return validate_pairs(stage1, "LoRA stage 1 pairs"), validate_pairs(stage2, "LoRA stage 2 pairs")


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=training_precision(cfg))


def encode_weighted(encoder: PairEncoder, ens_cfg: EnsembleConfig, pairs: list[PreferencePair], part: int,
                    member: int | None = None) -> EncodedPairs:
    """`pairs` with every member's weight on each (part 0: validation; 1, 2: the training phases); with
    `member`, that member's row alone. The rows are drawn for all k members at once (bootstrap and disjoint
    draws depend on k), so a member trained on its own needs k and its index."""
    weights = member_weights(len(pairs), ens_cfg.k, ens_cfg.diversity,
                             seed_for(ens_cfg.seed, Stream.MEMBER_WEIGHTS, part))
    return encode_pairs(encoder, pairs, weights if member is None else weights[member:member + 1])


def train_ensemble(ens_cfg: EnsembleConfig, cfg: TrainConfig, train_pairs: list[PreferencePair],
                   val_pairs: list[PreferencePair] | None = None, output_dir: str | Path | None = None,
                   log_fn: LogFn | None = None, accelerator: Accelerator | None = None,
                   overwrite: bool = False, launch: LaunchConfig | None = None) -> TrainResult:
    """Build, train, evaluate and (optionally) save an ensemble. The folder appears only when complete; a
    non-empty `output_dir` that is not a saved ensemble is refused before training unless `overwrite`.

    A full ensemble trains member by member and is then assembled (rmens.training.members), by the same two
    functions a member step and an assembly step run.

    `launch`: this process is one rank of a sharded step (rmens.training.launcher starts them): the model is
    sharded with FSDP2 over the ranks, which split each batch of `cfg.batch_size` pairs between them, so the
    training computes what one process would, and rank 0 saves the gathered model. (A sharded full ensemble is
    trained one sharded member job at a time: rmens.training.launcher.)"""
    validate_pairs(train_pairs, "training pairs")
    if output_dir is not None:
        check_output_folder(output_dir, overwrite)
    check_max_length(ens_cfg.backbone, ens_cfg.max_length)  # from the model's config, before it is built
    start = time.perf_counter()
    acc = accelerator or make_accelerator(cfg)
    if ens_cfg.kind == "full" and launch is not None:
        raise ValueError("a sharded job trains one member of a full ensemble at a time (ShardedJob.member)")
    if ens_cfg.kind == "full":
        from rmens.training.members import assemble, train_member  # that module builds on this one

        # One member at a time: only its gradients and optimizer state are held next to the finished members'
        # weights, a lower peak than training the k backbones as one module.
        members = [train_member(ens_cfg, cfg, i, train_pairs, val_pairs, log_fn, acc) for i in range(ens_cfg.k)]
        return assemble(ens_cfg, cfg, members, val_pairs, output_dir, log_fn, acc, overwrite, start)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(ens_cfg.backbone)
    ensemble = build_ensemble(ens_cfg)
    encoder = PairEncoder(tokenizer, ens_cfg.max_length, ens_cfg.max_prompt_length)
    pad_id = tokenizer.pad_token_id
    val = encode_weighted(encoder, ens_cfg, val_pairs, 0) if val_pairs else None
    stages: dict[str, StageResult] = {}
    if ens_cfg.kind == "lora":
        stage1_pairs, stage2_pairs = lora_stage_split(train_pairs, ens_cfg.lora.stage1_fraction)
        trainer = EnsembleTrainer(acc, ensemble, cfg, pad_id, lr=cfg.lr, schedule=cfg.schedule, stage="stage1",
                                  log_fn=log_fn, launch=launch)
        stages["stage1"] = trainer.train(encode_weighted(encoder, ens_cfg, stage1_pairs, 1), val)
        acc.free_memory()  # the stage-1 optimizer's Adam state, which accelerate would hold through stage 2
        stage1 = trainer.ensemble if launch is None else \
            unsharded(trainer.ensemble, lambda: build_ensemble(ens_cfg), every_rank=True)
        ensemble = to_lora(stage1, ens_cfg)
        trainer = EnsembleTrainer(acc, ensemble, cfg, pad_id, lr=cfg.lora_lr, schedule=cfg.lora_schedule,
                                  stage="stage2", log_fn=log_fn, step_offset=stages["stage1"].steps, phase=2,
                                  launch=launch)
        stages["stage2"] = trainer.train(encode_weighted(encoder, ens_cfg, stage2_pairs, 2), val)
    else:
        trainer = EnsembleTrainer(acc, ensemble, cfg, pad_id, lr=cfg.lr, schedule=cfg.schedule, stage="train",
                                  log_fn=log_fn, launch=launch)
        stages["train"] = trainer.train(encode_weighted(encoder, ens_cfg, train_pairs, 1), val)
    ensemble = trainer.ensemble
    ensemble.standardisation = calibrate_members(ensemble, tokenizer, train_pairs, cfg)
    result = TrainResult(ensemble, None, {}, stages, 0.0)
    return finish_training(result, tokenizer, val, val_pairs, cfg, acc, output_dir, log_fn, overwrite, start,
                           plain=(lambda: trained_structure(ens_cfg)) if launch is not None else None)


def finish_training(result: TrainResult, tokenizer, val: EncodedPairs | None, val_pairs: list[PreferencePair] | None,
                    cfg: TrainConfig, acc: Accelerator, output_dir: str | Path | None, log_fn: LogFn | None,
                    overwrite: bool, start: float,
                    plain: Callable[[], RewardEnsemble] | None = None) -> TrainResult:
    """`result` (its trained or assembled ensemble and its stages) completed: validation metrics, logged after
    the last step, and the folder, written by the main process with train_metrics.json (metrics,
    calibration_responses, and steps, wall_time, history and state_mib per stage). `plain`: the ensemble is
    sharded (one rank of a sharded job), and this builds its unsharded structure (`unsharded`), which rank 0
    saves."""
    ensemble = result.ensemble
    if val is not None:
        with acc.autocast():  # the training's precision, as the prepared model it trained had
            result.metrics = evaluate_pairs(ensemble, val, tokenizer.pad_token_id, cfg.eval_batch_size, acc, val_pairs)
    if result.metrics and log_fn is not None and acc.is_main_process:
        log_fn(result.steps, scalar_metrics(result.metrics, "val_"))
    if plain is not None:  # rank 0 saves (and returns) the gathered model; the other ranks return theirs
        ensemble = result.ensemble = unsharded(ensemble, plain)
    if output_dir is not None:
        result.path = Path(output_dir)
        if acc.is_main_process:
            stages = result.stages
            summary = {"metrics": result.metrics, "steps": {k: s.steps for k, s in stages.items()},
                       "calibration_responses": ensemble.standardisation.responses,
                       "wall_time": {k: s.wall_time for k, s in stages.items()},
                       "state_mib": {k: s.state_mib for k, s in stages.items()},
                       "history": {k: s.history for k, s in stages.items()}}
            ensemble.save(result.path, tokenizer, extra={"train_metrics.json": summary}, overwrite=overwrite)
        acc.wait_for_everyone()
    result.wall_time = time.perf_counter() - start
    return result


def unsharded(sharded: RewardEnsemble, build: Callable[[], RewardEnsemble],
              every_rank: bool = False) -> RewardEnsemble:
    """A plain (unsharded) copy of a sharded model, on the CPU, on rank 0 (`every_rank`: on every rank, e.g. the
    LoRA recipe's stage-1 model that each rank puts adapters on); the other ranks get `sharded` back. `build`
    makes the unsharded structure the gathered weights are loaded into. Collective: every rank calls it."""
    state = gather_full_state(sharded, every_rank)
    if not state:  # another rank than 0, which has no copy to make
        return sharded
    copy = build()
    copy.load_state_dict(state)
    copy.standardisation = sharded.standardisation
    return copy


def trained_structure(ens_cfg: EnsembleConfig) -> RewardEnsemble:
    """A fresh ensemble shaped as a trained one of `ens_cfg` is (LoRA: with its adapters, as after stage 2)."""
    plain = build_ensemble(ens_cfg)
    return to_lora(plain, ens_cfg) if ens_cfg.kind == "lora" else plain
