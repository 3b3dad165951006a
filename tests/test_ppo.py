import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from rmens.data.prompts import synthetic_prompts
from rmens.data.schema import DataError
from rmens.generation_config import GenerationConfig
from rmens.models.config import EnsembleConfig
from rmens.models.ensemble import build_ensemble
from rmens.ppo.config import PPOConfig
from rmens.ppo.core import KLController, gae, masked_whiten, policy_loss, token_rewards, value_loss
from rmens.ppo.trainer import PPOTrainer, pack_rollout
from rmens.reward import CallableReward, RewardError


def e_count(prompt, response):
    """A learnable reward: how often the letter 'e' appears (favours tokens that contain it)."""
    return response.count("e") / 4


def config(**overrides):
    base = dict(policy=TINY, steps=3, rollout_batch_size=8, step_batch_size=4, lr=1e-2, warmup_steps=0,
                progress=False, checkpoint_every=1, generation=GenerationConfig(temperature=1.0, top_p=1.0,
                                                                                 max_new_tokens=8, batch_size=8))
    return PPOConfig(**{**base, **overrides})


def test_gae_against_hand_computed_values():
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=1: delta = 1 + 0 - 0.25 = 0.75; t=0: delta = 0 + 0.25 - 0.5 = -0.25, adv = -0.25 + 0.5 * 0.75
    torch.testing.assert_close(adv, torch.tensor([[0.125, 0.75, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.625, 1.0, 0.0]]))


def test_token_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    rewards = token_rewards(kl, torch.tensor([2.0, 3.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 1.95, 0.0], [2.9, 0.0, 0.0]]))


def test_clipped_losses_and_whitening():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    loss, stats = policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2) and stats["clipfrac"].item() == 1.0
    vloss, _ = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert vloss.item() == pytest.approx(0.5 * 0.8**2)
    white = masked_whiten(torch.tensor([[1.0, 3.0, 7.0]]), torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor(2.0),
                          torch.tensor(1.0))
    torch.testing.assert_close(white, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    controller = KLController(0.1, adaptive=True, target=1.0, horizon=100)
    controller.update(current_kl=2.0, n_samples=10)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * 1.02)


def test_pack_rollout_positions_point_at_the_predicting_state():
    batch = pack_rollout([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    assert batch["positions"][0, :2].tolist() == [2, 3] and batch["positions"][1].tolist() == [0, 1, 2]
    assert batch["mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_ppo_raises_a_learnable_reward_with_finite_kl(tmp_path):
    cfg = config(steps=15, rollout_batch_size=32, step_batch_size=16, generation=GenerationConfig(
        temperature=1.0, top_p=1.0, max_new_tokens=12, batch_size=32), checkpoint_every=100)
    result = PPOTrainer(cfg, synthetic_prompts(32), CallableReward(e_count), tmp_path).train()
    rewards = [h["reward"] for h in result.history]
    assert result.history[0]["kl"] == 0.0, "before the first update the policy is the reference"
    assert sum(rewards[-4:]) / 4 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert all(math.isfinite(h["kl"]) for h in result.history)
    for key in ("entropy", "clipfrac", "approxkl", "value_loss", "response_length", "kl_coef"):
        assert key in result.history[-1]
    assert (tmp_path / "policy" / "config.json").is_file() and (tmp_path / "history.json").is_file()


def test_ensemble_reward_logs_members_and_spread(tmp_path, tiny_tokenizer):
    ensemble = build_ensemble(EnsembleConfig(kind="linear", k=3, backbone=TINY)).eval()
    from rmens.reward import EnsembleReward

    reward = EnsembleReward(ensemble, tiny_tokenizer, allow_unstandardised=True)  # untrained: no statistics
    gold = CallableReward(e_count)
    trainer = PPOTrainer(config(steps=1, gold_every=1), synthetic_prompts(8), reward, tmp_path, gold_fn=gold)
    stats = trainer.train().history[0]
    assert {"reward_m0", "reward_m1", "reward_m2", "reward_std", "gold"} <= set(stats)
    assert stats["reward"] == pytest.approx((stats["reward_m0"] + stats["reward_m1"] + stats["reward_m2"]) / 3,
                                            abs=1e-5)


class Crash(Exception):
    pass


def test_resumed_run_follows_the_uninterrupted_trajectory(tmp_path):
    prompts = synthetic_prompts(16)
    full = PPOTrainer(config(steps=4, checkpoint_every=2), prompts, CallableReward(e_count), tmp_path / "a").train()

    calls = {"n": 0}

    def crashing(prompt, response):
        calls["n"] += 1
        if calls["n"] > 2 * 8:  # dies during step 3, after the step-2 checkpoint
            raise Crash()
        return e_count(prompt, response)

    with pytest.raises(Crash):
        PPOTrainer(config(steps=4, checkpoint_every=2), prompts, CallableReward(crashing), tmp_path / "b").train()
    assert [p.name for p in sorted((tmp_path / "b" / "checkpoints").glob("step-*"))] == ["step-000002"]
    resumed = PPOTrainer(config(steps=4, checkpoint_every=2), prompts, CallableReward(e_count), tmp_path / "b").train()
    assert resumed.history == full.history
    a = load_file(tmp_path / "a" / "checkpoints" / "step-000004" / "trainable.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_reward_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def bad_at_second_step(prompt, response):
        calls["n"] += 1
        return float("nan") if calls["n"] > 8 else 1.0

    trainer = PPOTrainer(config(steps=3), synthetic_prompts(8), CallableReward(bad_at_second_step), tmp_path)
    with pytest.raises(RewardError, match="non-finite reward"):
        trainer.train()
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-000001"]
    assert not (tmp_path / "policy").exists()


def test_bad_prompts_are_errors(tmp_path):
    with pytest.raises(DataError, match="prompt list is empty"):
        PPOTrainer(config(), [], CallableReward(e_count), tmp_path)
    with pytest.raises(DataError, match="prompt 1 has"):
        PPOTrainer(config(), ["fine", "long " * 600], CallableReward(e_count), tmp_path)
    with pytest.raises(ValueError, match="multiple of step_batch_size"):
        config(rollout_batch_size=6, step_batch_size=4)


@pytest.mark.parametrize("use_lora", [False, True])
def test_reward_initialised_value_model(tmp_path, tiny_tokenizer, use_lora):
    ensemble = build_ensemble(EnsembleConfig(kind="linear", k=2, backbone=TINY)).eval()
    ensemble.save(tmp_path / "rm", tiny_tokenizer)
    cfg = config(steps=2, use_lora=use_lora, lr=1e-4, value_model="reward")
    trainer = PPOTrainer(cfg, synthetic_prompts(8), CallableReward(e_count), tmp_path / "ppo",
                         reward_folder=tmp_path / "rm")
    torch.testing.assert_close(trainer.unwrapped.value_head.weight[0], ensemble.heads.weight.mean(dim=0))
    trainable = [n for n, p in trainer.unwrapped.named_parameters() if p.requires_grad]
    assert any(n.startswith("value_backbone") for n in trainable)
    assert all("lora_" in n or n.startswith("value_head") for n in trainable) == use_lora
    history = trainer.train().history
    assert history[0]["kl"] == 0.0 and math.isfinite(history[1]["kl"])


def test_ppo_runs_data_parallel_on_two_cpu_processes(tmp_path, tiny_tokenizer):
    from rmens.data.loaders import synthetic_pairs
    from rmens.models.standardise import calibrate, pair_responses

    ensemble = build_ensemble(EnsembleConfig(kind="linear", k=2, backbone=TINY)).eval()
    # A saved ensemble of several members carries its standardisation (training computes it).
    ensemble.standardisation = calibrate(ensemble, tiny_tokenizer, *pair_responses(synthetic_pairs(8)))
    ensemble.save(tmp_path / "rm", tiny_tokenizer)
    job = tmp_path / "ppo.yaml"
    job.write_text(
        f"reward_ensemble: {tmp_path / 'rm'}\n"
        f"ppo: {{policy: {TINY}, steps: 2, rollout_batch_size: 4, step_batch_size: 2, progress: false,\n"
        "      checkpoint_every: 1, generation: {max_new_tokens: 6}}\n"
        "prompts: {source: synthetic, max_prompts: 16}\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
           "-m", "rmens.cli", "ppo", "--config", str(job), "--output", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2] and history[0]["kl"] == 0.0
    assert (tmp_path / "out" / "policy" / "config.json").is_file()


def test_resume_refuses_other_settings_and_restart_starts_over(tmp_path):
    prompts = synthetic_prompts(8)
    PPOTrainer(config(steps=2), prompts, CallableReward(e_count), tmp_path, reward_id="reward-a").train()
    with pytest.raises(ValueError, match=r"lr 0\.01 -> 1e-05.*reward source reward-a -> reward-b"):
        PPOTrainer(config(steps=2, lr=1e-5), prompts, CallableReward(e_count), tmp_path, reward_id="reward-b").train()
    with pytest.raises(ValueError, match="the checkpoint is at step 2, past steps=1"):
        PPOTrainer(config(steps=1), prompts, CallableReward(e_count), tmp_path, reward_id="reward-a").train()
    longer = PPOTrainer(config(steps=3), prompts, CallableReward(e_count), tmp_path, reward_id="reward-a").train()
    assert [h["step"] for h in longer.history] == [1, 2, 3]  # more steps continue the same run
    again = PPOTrainer(config(steps=1, lr=1e-5), prompts, CallableReward(e_count), tmp_path, reward_id="reward-b")
    result = again.train(resume=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]
    assert len(result.history) == 1 and json.loads((tmp_path / "history.json").read_text()) == result.history
    state = json.loads((tmp_path / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
    assert state["config"]["lr"] == 1e-5 and state["reward"] == "reward-b"


def test_ppo_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a PPO run's folder"):
        PPOTrainer(config(), synthetic_prompts(8), CallableReward(e_count), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_ensemble_rewards_identify_their_source(tiny_tokenizer):
    from rmens.models.config import AggregationConfig
    from rmens.ppo.trainer import reward_identity
    from rmens.reward import EnsembleReward

    a = build_ensemble(EnsembleConfig(kind="linear", k=2, backbone=TINY, seed=0))
    b = build_ensemble(EnsembleConfig(kind="linear", k=2, backbone=TINY, seed=1))
    ids = {reward_identity(EnsembleReward(e, tiny_tokenizer, AggregationConfig(rule=rule), allow_unstandardised=True))
           for e in (a, b) for rule in ("mean", "min")}
    assert len(ids) == 4 and reward_identity(CallableReward(e_count)) is None
