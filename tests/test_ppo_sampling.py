"""PPO samples from exactly the distribution whose log-probs its ratios and KL penalty use."""

import pytest
import torch
from conftest import TINY
from pydantic import ValidationError

from rmens.config import derive
from rmens.data.prompts import synthetic_prompts
from rmens.generation import generate
from rmens.generation_config import GenerationConfig
from rmens.models.backbone import load_policy, load_tokenizer
from rmens.ppo.config import PPOConfig
from rmens.ppo.trainer import PPOTrainer, full_softmax_sampling, pack_rollout, response_logprobs
from rmens.reward import CallableReward


def test_ppo_refuses_truncated_or_greedy_sampling():
    with pytest.raises(ValidationError, match=r"generation\.top_p=0\.9 must be 1"):
        PPOConfig(generation=GenerationConfig(top_p=0.9))
    with pytest.raises(ValidationError, match=r"generation\.do_sample=false"):
        PPOConfig(generation=GenerationConfig(do_sample=False))
    default = PPOConfig().generation
    assert (default.top_p, default.temperature, default.do_sample) == (1.0, 0.7, True)


def record_sampler_scores(monkeypatch, causal_lm) -> list[torch.Tensor]:
    """From now on, every causal_lm.generate call also keeps the processed scores each token was sampled
    from ([B, T, V]: after temperature, top-p and any other logits processor)."""
    scores = []
    original = causal_lm.generate

    def generate_and_record(**kwargs):
        out = original(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, dim=1))
        return out.sequences

    monkeypatch.setattr(causal_lm, "generate", generate_and_record)
    return scores


def sampler_logprobs(scores: list[torch.Tensor], batch: dict) -> torch.Tensor:
    """[B, R]: the log-probability the sampler gave each response token (one generate call)."""
    (step_scores,) = scores
    logp = torch.log_softmax(step_scores.float(), dim=-1)[:, : batch["tokens"].shape[1]]
    return torch.gather(logp, -1, batch["tokens"].unsqueeze(-1)).squeeze(-1)


def test_ppo_logprobs_are_those_the_sampler_used(tmp_path, monkeypatch):
    # PPO's default sampling (fails when the default truncates, as top_p 0.9 did), at test sizes.
    sampling = derive(PPOConfig().generation, max_new_tokens=6, batch_size=4)
    cfg = PPOConfig(policy=TINY, rollout_batch_size=4, step_batch_size=4, progress=False, generation=sampling)
    trainer = PPOTrainer(cfg, synthetic_prompts(4), CallableReward(lambda prompt, response: 0.0), tmp_path)
    causal_lm = trainer.unwrapped.causal_lm
    causal_lm.generation_config.repetition_penalty = 3.0  # a model's own sampling default must not apply
    scores = record_sampler_scores(monkeypatch, causal_lm)
    rollout = trainer.rollout(0)
    mask = rollout.batch["mask"].bool()
    torch.testing.assert_close(rollout.logprobs[mask], sampler_logprobs(scores, rollout.batch)[mask],
                               rtol=0, atol=1e-4)
    assert causal_lm.generation_config.repetition_penalty == 3.0, "the model's defaults are restored"


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_ppo_logprobs_match_untruncated_sampling_only(monkeypatch, top_p):
    """The check above can tell: under top-p the sampler renormalises over the nucleus, so every sampled
    token's probability is higher than its full-softmax probability."""
    policy, tokenizer = load_policy(TINY), load_tokenizer(TINY, padding_side="left")
    scores = record_sampler_scores(monkeypatch, policy)
    cfg = GenerationConfig(temperature=0.7, top_p=top_p, max_new_tokens=6, batch_size=4)
    with full_softmax_sampling(policy):
        samples = generate(policy, tokenizer, synthetic_prompts(4), cfg)
    batch = pack_rollout(samples.prompt_ids, samples.response_ids, tokenizer.pad_token_id)
    with torch.no_grad():
        ppo, _, _ = response_logprobs(policy, batch, cfg.temperature)
    mask = batch["mask"].bool()
    gap = sampler_logprobs(scores, batch)[mask] - ppo[mask]
    if top_p == 1.0:
        assert gap.abs().max() < 1e-4
    else:
        assert (gap > 1e-3).all()
