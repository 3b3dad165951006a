"""PPO for language models with an (ensemble) reward, written here because TRL removed its PPOTrainer
and no maintained PPO takes an ensemble reward with a conservative aggregation rule.

The loop follows Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO") and AlpacaFarm's
PPO: sample responses, score them, penalise per-token KL to the reference, GAE, whitened advantages,
`ppo_epochs` passes of clipped policy and value losses over minibatches.

Reproducibility: every random choice of step t (prompt order, sampling, minibatch order) is seeded
from (seed, t, process), and a checkpoint holds the trainable weights, optimizer, scheduler and KL
controller, so a run resumed from a checkpoint follows the same trajectory as one never stopped.
Data parallel: under `accelerate launch`, each process generates and scores its share of the rollout
batch; whitening statistics and the KL used by the controller are reduced across processes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig as HFGenerationConfig
from transformers import get_scheduler

from rmens.config import flatten
from rmens.data.schema import DataError
from rmens.fingerprint import placement_fields
from rmens.generation import generate
from rmens.io import refuse_foreign_folder, write_json
from rmens.models.aggregate import member_std
from rmens.models.backbone import load_backbone, load_policy, load_tokenizer
from rmens.models.ensemble import read_standardisation
from rmens.ppo.config import PPOConfig
from rmens.ppo.core import (
    KLController,
    gae,
    logprobs_and_entropy,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from rmens.reward import RewardError, RewardFn
from rmens.seeding import Stream, seed_for

log = logging.getLogger(__name__)


class ActorCritic(nn.Module):
    """The policy (optionally under LoRA) and its value function.

    Logits are computed only at response positions: the vocabulary projection is the widest matmul of
    a small model, and prompt positions never need it.
    """

    def __init__(self, policy: nn.Module, value_head: nn.Linear, value_backbone: nn.Module | None,
                 temperature: float):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.value_backbone = value_backbone
        self.temperature = temperature

    @property
    def causal_lm(self) -> nn.Module:
        return self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy

    def policy_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return response_logprobs(self.causal_lm, batch, self.temperature)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (logprobs [B, R], entropy [B, R], values [B, R])."""
        logprobs, entropy, hidden = self.policy_logprobs(batch)
        if self.value_backbone is not None:
            hidden = response_states(self.value_backbone, batch)
        return logprobs, entropy, self.value_head(hidden).squeeze(-1)


def response_states(backbone: nn.Module, batch: dict) -> torch.Tensor:
    """[B, R, H]: the hidden states that predict each response token."""
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
    index = batch["positions"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)


def response_logprobs(causal_lm: nn.Module, batch: dict, temperature: float):
    """-> (log-probabilities [B, R], entropy [B, R], hidden states [B, R, H]) of the response tokens."""
    hidden = response_states(causal_lm.get_decoder(), batch)
    logits = causal_lm.get_output_embeddings()(hidden)
    # Exact log-probs of the sampler: rollouts come from the full softmax at this temperature (PPOConfig
    # refuses top_p < 1, rmens.generation passes top_k=0, full_softmax_sampling drops the model's own
    # sampling defaults), so no token was drawn from a truncated or reshaped distribution.
    logprobs, entropy = logprobs_and_entropy(logits, batch["tokens"], temperature)
    return logprobs, entropy, hidden


@contextmanager
def full_softmax_sampling(causal_lm: nn.Module) -> Iterator[None]:
    """While generating, keep only the special tokens of the model's own generation defaults: those from its
    generation_config.json (repetition_penalty, min_p, typical_p, ...) apply under any arguments generate()
    is not given, and would reshape or truncate the distribution that `response_logprobs` scores. Restored
    afterwards, so a saved policy keeps its defaults."""
    saved = causal_lm.generation_config
    causal_lm.generation_config = HFGenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id)
    try:
        yield
    finally:
        causal_lm.generation_config = saved


@dataclass
class Rollout:
    prompts: list[str]
    texts: list[str]
    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, positions, tokens, mask
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class PPOResult:
    history: list[dict]
    policy_path: Path | None
    wall_time: float


def pack_rollout(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response sequences, and where each response token sits."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    width, resp_width = max(map(len, seqs)), max(map(len, response_ids))
    n = len(seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, resp_width), dtype=torch.long)
    tokens = torch.full((n, resp_width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, resp_width))
    for row, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        attn[row, : len(p) + len(r)] = 1
        positions[row, : len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1)
        positions[row, len(r):] = len(p) + len(r) - 1
        tokens[row, : len(r)] = torch.tensor(r)
        mask[row, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "positions": positions, "tokens": tokens, "mask": mask}


def _slice(batch: dict[str, torch.Tensor], rows) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


def build_actor_critic(cfg: PPOConfig, reward_folder: str | Path | None = None) -> tuple[ActorCritic, nn.Module | None]:
    """The trainable actor-critic and, for full fine-tuning, a frozen reference copy (else None)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg.policy)
    reference = None
    lora = None
    if cfg.use_lora:
        lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules))
        policy = get_peft_model(policy, lora)
    else:
        reference = load_policy(cfg.policy).eval().requires_grad_(False)
    hidden = policy.config.hidden_size
    value_backbone = None
    value_head = nn.Linear(hidden, 1)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed_for(cfg.seed, Stream.VALUE_HEAD))
        value_head.weight.normal_(0.0, 1.0 / (hidden + 1) ** 0.5, generator=generator)
        value_head.bias.zero_()
    if cfg.value_model == "reward":
        value_backbone, value_head = _value_from_reward(cfg, reward_folder, lora)
    return ActorCritic(policy, value_head, value_backbone, cfg.generation.temperature), reference


def _value_from_reward(cfg: PPOConfig, reward_folder, lora) -> tuple[nn.Module, nn.Linear]:
    """A value model initialised from the reward ensemble: its (first) backbone and mean head, with each
    member's standardisation folded into its head (PPO's reward aggregates standardised members)."""
    if reward_folder is None:
        raise ValueError("value_model='reward' needs the reward ensemble's folder")
    folder = Path(reward_folder)
    backbone_dir = folder / "backbone" if (folder / "backbone").is_dir() else folder / "members" / "0"
    if load_tokenizer(str(folder / "tokenizer")).get_vocab() != load_tokenizer(cfg.policy).get_vocab():
        raise ValueError("value_model='reward' needs the reward model and the policy to share a tokenizer")
    backbone = load_backbone(str(backbone_dir))
    heads = load_file(folder / "heads.safetensors")
    weight, bias = heads["weight"], heads["bias"]
    standardisation = read_standardisation(folder)
    if standardisation is not None:
        weight, bias = standardisation.fold_into_heads(weight, bias)
    head = nn.Linear(weight.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(weight.mean(dim=0, keepdim=True))
        head.bias.copy_(bias.mean().reshape(1))
    if lora is not None:  # the value model trains like the policy: under LoRA, with the same settings
        from peft import get_peft_model

        backbone = get_peft_model(backbone, copy.deepcopy(lora))
    return backbone, head


# Settings a run may change when it resumes from a checkpoint: they do not change what was trained so far.
# (judge_every: gold_every's name in checkpoints saved before the role was called gold.)
RESUME_SAFE = frozenset({"steps", "progress", "checkpoint_every", "keep_checkpoints", "gold_every", "judge_every"})
RUN_FILES = ("checkpoints", "policy", "history.json")  # what marks a folder as a PPO run's


def reward_identity(reward_fn: RewardFn) -> str | None:
    """What identifies a reward source across processes, so a resumed run can check it optimises the same
    reward: an ensemble's heads and rule (None for rewards that cannot be identified)."""
    ensemble = getattr(reward_fn, "ensemble", None)
    if ensemble is None:
        return getattr(reward_fn, "identity", None)
    digest = hashlib.sha256(ensemble.heads.weight.detach().cpu().float().numpy().tobytes())
    digest.update(ensemble.heads.bias.detach().cpu().float().numpy().tobytes())
    digest.update(reward_fn.aggregation.model_dump_json().encode())
    standardisation = getattr(reward_fn, "standardisation", None)  # recalibrating changes the reward PPO sees
    if standardisation is not None:
        digest.update(json.dumps(standardisation.to_json(), sort_keys=True).encode())
    return f"{ensemble.kind}-k{ensemble.k}-{digest.hexdigest()[:16]}"


def resume_conflicts(saved: dict, cfg: PPOConfig, reward: str | None) -> list[str]:
    """The settings (dotted names) in which a checkpoint's run differs from this one, beyond RESUME_SAFE."""
    before, now = flatten(saved["config"]), flatten(cfg)
    # where the run's parts are placed (ppo.reward_devices, ...) is in neither its key nor what it trained
    placement = placement_fields(cfg)
    placed = set(flatten(cfg.model_dump(mode="json", include=placement))) if placement else set()
    changed = [f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
               if key.split(".")[0] not in RESUME_SAFE and key not in placed and before.get(key) != now.get(key)]
    if saved.get("reward") and reward and saved["reward"] != reward:
        changed.append(f"reward source {saved['reward']} -> {reward}")
    if saved["step"] > cfg.steps:
        changed.append(f"steps: the checkpoint is at step {saved['step']}, past steps={cfg.steps}")
    return changed


class PPOTrainer:
    def __init__(self, cfg: PPOConfig, prompts: list[str], reward_fn: RewardFn, output_dir: str | Path,
                 *, gold_fn: RewardFn | None = None, reward_folder: str | Path | None = None,
                 log_fn: Callable[[int, dict], None] | None = None, accelerator: Accelerator | None = None,
                 reward_id: str | None = None):
        if not prompts:
            raise DataError("PPO needs at least one prompt; the prompt list is empty")
        output_dir = Path(output_dir)
        refuse_foreign_folder(output_dir, any((output_dir / f).exists() for f in RUN_FILES), "a PPO run's folder",
                              "choose another output folder")
        self.reward_id = reward_id or reward_identity(reward_fn)
        self.cfg = cfg
        self.prompts = list(prompts)
        self.reward_fn = reward_fn
        self.gold_fn = gold_fn
        self.output_dir = output_dir
        self.log_fn = log_fn
        self.acc = accelerator or Accelerator()
        self.tokenizer = load_tokenizer(cfg.policy, padding_side="left")
        model, self.reference = build_actor_critic(cfg, reward_folder)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=cfg.lr)
        # Warm-up, then constant (the paper's setting); stepped once per optimizer step.
        self.scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.kl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
        self.history: list[dict] = []
        self.step = 0
        # Check every prompt against the context once, up front, rather than mid-run.
        from rmens.generation import encode_prompts
        from rmens.models.backbone import context_length

        encode_prompts(self.tokenizer, self.prompts, cfg.generation.max_new_tokens, context_length(model.policy.config))

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> ActorCritic:
        return self.acc.unwrap_model(self.model)

    def prompts_for_step(self, step: int) -> list[str]:
        """This process's prompts at `step`: consecutive slices of seeded per-epoch permutations."""
        size, world = self.cfg.rollout_batch_size, self.acc.num_processes
        start = (step * world + self.acc.process_index) * size
        out = []
        for position in range(start, start + size):
            epoch, offset = divmod(position, len(self.prompts))
            generator = torch.Generator().manual_seed(seed_for(self.cfg.seed, Stream.PROMPT_ORDER, epoch))
            order = torch.randperm(len(self.prompts), generator=generator)
            out.append(self.prompts[int(order[offset])])
        return out

    def _reduce_mean(self, value: torch.Tensor | float) -> float:
        tensor = torch.as_tensor(value, dtype=torch.float32, device=self.acc.device)
        return float(self.acc.reduce(tensor, "mean"))

    @torch.no_grad()
    def _forward_chunks(self, batch: dict, reference: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.unwrapped
        outs = []
        for start in range(0, batch["tokens"].shape[0], self.cfg.step_batch_size):
            chunk = _slice(batch, slice(start, start + self.cfg.step_batch_size))
            if not reference:
                outs.append(model(chunk))
            elif self.reference is not None:
                outs.append(response_logprobs(self.reference, chunk, model.temperature)[:2] + (None,))
            else:
                with model.policy.disable_adapter():
                    outs.append(model.policy_logprobs(chunk)[:2] + (None,))
        cat = [torch.cat([o[i] for o in outs]) if outs[0][i] is not None else None for i in range(3)]
        return cat[0], cat[1], cat[2]

    # -- one step ----------------------------------------------------------------------------------
    def rollout(self, step: int) -> Rollout:
        cfg = self.cfg
        prompts = self.prompts_for_step(step)
        with full_softmax_sampling(self.unwrapped.causal_lm):
            samples = generate(self.unwrapped.causal_lm, self.tokenizer, prompts, cfg.generation,
                               stream=Stream.ROLLOUT, indices=(self.cfg.seed, step, self.acc.process_index))
        batch = {k: v.to(self.acc.device) for k, v in
                 pack_rollout(samples.prompt_ids, samples.response_ids, self.tokenizer.pad_token_id).items()}
        logprobs, entropy, values = self._forward_chunks(batch, reference=False)
        ref_logprobs, _, _ = self._forward_chunks(batch, reference=True)
        rewards = self.reward_fn(prompts, samples.texts)
        try:
            rewards.check(len(prompts), f"PPO step {step}")
            bad = torch.zeros(())
        except RewardError as err:
            bad, error = torch.ones(()), err
        if float(self.acc.reduce(bad.to(self.acc.device), "sum")) > 0:  # every process stops together
            raise error if bad else RewardError(f"PPO step {step}: non-finite reward on another process")
        scores = rewards.scores.to(self.acc.device).float()
        finished = torch.tensor(samples.finished, dtype=torch.bool, device=self.acc.device)
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(finished, scores, scores - cfg.missing_eos_penalty)
        mask = batch["mask"]
        stats = {
            "reward": self._reduce_mean(rewards.scores.mean()),
            "score_after_penalty": self._reduce_mean(scores.mean()),
            "entropy": self._reduce_mean(masked_mean(entropy, mask)),
            "response_length": self._reduce_mean(mask.sum(dim=1).mean()),
            "finished_fraction": self._reduce_mean(finished.float().mean()),
        }
        if rewards.members is not None:
            for i, member in enumerate(rewards.members):
                stats[f"reward_m{i}"] = self._reduce_mean(member.mean())
            stats["reward_std"] = self._reduce_mean(member_std(rewards.members).mean())
        if self.gold_fn is not None and self.cfg.gold_every and step % self.cfg.gold_every == 0:
            judged = self.gold_fn(prompts, samples.texts).check(len(prompts), f"gold at PPO step {step}")
            stats["gold"] = self._reduce_mean(judged.scores.mean())
        return Rollout(prompts, samples.texts, batch, logprobs, ref_logprobs, values, scores, stats)

    def _global_whiten(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        total = self.acc.reduce(torch.stack([(values * mask).sum(), mask.sum()]), "sum")
        mean = total[0] / total[1]
        var = self.acc.reduce(((values - mean) ** 2 * mask).sum(), "sum") / total[1]
        return masked_whiten(values, mask, mean, var)

    def update(self, ro: Rollout, step: int) -> dict[str, float]:
        cfg = self.cfg
        mask = ro.batch["mask"]
        kl = (ro.logprobs - ro.ref_logprobs) * mask
        rewards = token_rewards(kl, ro.scores, mask, self.kl.value)
        advantages, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = self._global_whiten(advantages, mask)
        sums: dict[str, float] = {}
        updates = 0
        self.model.train()
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(ro.prompts), generator=torch.Generator().manual_seed(
                seed_for(self.cfg.seed, Stream.MINIBATCH, step, epoch, self.acc.process_index)))
            for start in range(0, len(order), cfg.step_batch_size):
                rows = order[start: start + cfg.step_batch_size].to(self.acc.device)
                chunk = _slice(ro.batch, rows)
                logprobs, entropy, values = self.model(chunk)
                m = chunk["mask"]
                pg, pg_stats = policy_loss(logprobs, ro.logprobs[rows], advantages[rows], m, cfg.cliprange)
                vf, vf_stats = value_loss(values, ro.values[rows], returns[rows], m, cfg.cliprange_value)
                loss = pg + cfg.vf_coef * vf
                self.acc.backward(loss)
                grad_norm = self.acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                updates += 1
                for name, value in {"policy_loss": pg, "value_loss": vf, "grad_norm": grad_norm,
                                    **pg_stats, **vf_stats}.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
        seq_kl = kl.sum(dim=1).mean()
        stats = {name: self._reduce_mean(total / updates) for name, total in sums.items()}
        stats["kl"] = self._reduce_mean(seq_kl)
        stats["kl_coef"] = self.kl.value
        stats["lr"] = self.scheduler.get_last_lr()[0]
        stats["advantage_mean"] = self._reduce_mean(masked_mean(advantages, mask))
        stats["return_mean"] = self._reduce_mean(masked_mean(returns, mask))
        stats["value_mean"] = self._reduce_mean(masked_mean(ro.values, mask))
        self.kl.update(stats["kl"], cfg.rollout_batch_size * self.acc.num_processes)
        return stats

    # -- checkpoints -------------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.unwrapped.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> Path:
        root = self.output_dir / "checkpoints"
        path = root / f"step-{self.step:06d}"
        if self.acc.is_main_process:
            tmp = root / f".tmp-step-{self.step:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(self._trainable_state(), tmp / "trainable.safetensors")
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       tmp / "optimizer.pt")
            state = {"step": self.step, "kl_coef": self.kl.value, "history": self.history,
                     "config": self.cfg.model_dump(mode="json"), "reward": self.reward_id}
            write_json(tmp / "trainer_state.json", state)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            if self.cfg.keep_checkpoints:
                for old in sorted(root.glob("step-*"))[: -self.cfg.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return path

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.output_dir / "checkpoints").glob("step-*"))
        return found[-1] if found else None

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from a checkpoint of the same run: a checkpoint made with other settings or another reward
        is refused, naming what differs (start over with train(resume=False), `rmens ppo --restart`)."""
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        conflicts = resume_conflicts(state, self.cfg, self.reward_id)
        if conflicts:
            raise ValueError(f"{path} was made by another PPO run ({'; '.join(conflicts)}); restart (rmens ppo "
                             "--restart) or choose another output folder")
        weights = load_file(path / "trainable.safetensors")
        expected = {n for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        if set(weights) != expected:
            raise ValueError(f"{path} does not match this PPO configuration's trainable parameters")
        self.unwrapped.load_state_dict(weights, strict=False)
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        self.kl.value = state["kl_coef"]
        self.history = state["history"]
        self.step = state["step"]
        log.info("resumed PPO from %s (step %d)", path, self.step)

    def save_policy(self, path: str | Path) -> Path:
        """The trained policy as a plain transformers folder (LoRA merged), with its tokenizer."""
        path = Path(path)
        if self.acc.is_main_process:
            tmp = path.with_name(path.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            policy = self.unwrapped.policy
            if hasattr(policy, "merge_and_unload"):  # merge into a fresh copy; the trainer keeps its adapters
                from peft import PeftModel

                adapter = self.output_dir / ".adapter-export"
                policy.save_pretrained(adapter)
                policy = PeftModel.from_pretrained(load_policy(self.cfg.policy), adapter).merge_and_unload()
                shutil.rmtree(adapter, ignore_errors=True)
            policy.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        self.acc.wait_for_everyone()
        return path

    # -- the loop ----------------------------------------------------------------------------------
    def _clear_previous_run(self) -> None:
        """Starting over: an earlier run's checkpoints, policy and history in this folder would be taken for
        this run's."""
        if self.acc.is_main_process:
            for name in RUN_FILES:
                target = self.output_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        self.acc.wait_for_everyone()

    def train(self, resume: bool = True) -> PPOResult:
        """Run until `steps`; with `resume`, continue from the latest checkpoint of the same run, else start
        over (an earlier run's files in the folder are removed first)."""
        start = time.perf_counter()
        latest = self.latest_checkpoint() if resume else None
        if latest is not None:
            self.load_checkpoint(latest)
        elif not resume:
            self._clear_previous_run()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="ppo",
                   disable=not (self.cfg.progress and self.acc.is_main_process))
        while self.step < self.cfg.steps:
            ro = self.rollout(self.step)
            stats = {**ro.stats, **self.update(ro, self.step)}
            self.step += 1
            self.history.append({"step": self.step, **stats})
            if self.log_fn is not None and self.acc.is_main_process:
                self.log_fn(self.step, stats)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.save_checkpoint()
        bar.close()
        policy_path = self.save_policy(self.output_dir / "policy")
        if self.acc.is_main_process:
            write_json(self.output_dir / "history.json", self.history)
        return PPOResult(self.history, policy_path, time.perf_counter() - start)
