"""The arithmetic of PPO for language models, as pure functions on padded [batch, tokens] tensors.

Follows "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024): per-token KL penalty,
score at the last response token, GAE, masked advantage whitening, clipped policy and value losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                  shift_mean: bool = True) -> torch.Tensor:
    """Normalise with given (possibly cross-process) statistics; padding stays zero."""
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * KL per token, plus the sequence score on each sequence's last response token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens -> (advantages, returns)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float) -> tuple[torch.Tensor, dict]:
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, cliprange_value: float) -> tuple[torch.Tensor, dict]:
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask)}
    return loss, stats


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of `tokens` under temperature-scaled logits (as they were sampled), and entropy."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    chosen = torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return chosen, entropy


class KLController:
    """Fixed coefficient, or Ziegler et al.'s adaptive controller towards a target KL."""

    def __init__(self, coef: float, adaptive: bool, target: float, horizon: int):
        self.value = coef
        self.adaptive = adaptive
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if not self.adaptive:
            return
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_samples / self.horizon
