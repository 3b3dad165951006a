"""The ensemble as a TRL reward function: GRPO trains against it (2 steps of the tiny model on CPU), TRL logs
its reward under the rule's name and the members' statistics through its log_metric hook."""

from __future__ import annotations

import pytest
import torch

from rmens.integrations.trl import ensemble_reward_func
from rmens.models.config import AggregationConfig
from rmens.reward import EnsembleReward

trl = pytest.importorskip("trl")


@pytest.fixture(scope="module")
def saved(standardised_ensemble):
    return standardised_ensemble


def test_the_reward_function_gives_the_librarys_rewards_for_text_and_conversations(saved):
    fn = ensemble_reward_func(saved, rule="lcb1")
    rule = AggregationConfig.from_name("lcb1")
    reward = EnsembleReward.from_folder(saved, rule)
    prompts, completions = ["Name a fruit.", "Sky colour?"], [" An apple.", " Blue."]
    logged: dict[str, float] = {}
    got = fn(prompts, completions, log_metric=logged.__setitem__)
    assert fn.__name__ == f"rmens_{rule.name}" == "rmens_lcb1"
    assert got == pytest.approx(reward(prompts, completions).scores.tolist(), abs=1e-5)
    assert {"rmens/member_std", "rmens/member_0", "rmens/member_1"} == set(logged)
    chat = fn([[{"role": "user", "content": p}] for p in prompts],
              [[{"role": "assistant", "content": c}] for c in completions])
    assert len(chat) == 2 and all(isinstance(x, float) for x in chat)
    with pytest.raises(ValueError, match="a completion must be text"):
        fn(prompts, [1, 2])


def test_two_grpo_steps_of_the_tiny_model_train_against_the_ensemble(saved, tiny_path, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=2, per_device_train_batch_size=2,
                      num_generations=2, max_completion_length=8, learning_rate=1e-4, logging_steps=1,
                      report_to=[], use_cpu=True, save_strategy="no", seed=0)
    dataset = Dataset.from_dict({"prompt": ["Name a fruit.", "What colour is the sky?"] * 4})
    trainer = GRPOTrainer(model=tiny_path, reward_funcs=[ensemble_reward_func(saved, rule="min")], args=args,
                          train_dataset=dataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rewards/rmens_min/mean" in entry]
    assert trainer.state.global_step == 2 and logs, trainer.state.log_history
    assert all(torch.isfinite(torch.tensor(entry["rewards/rmens_min/mean"])) for entry in logs)
    assert any("rmens/member_std" in entry for entry in trainer.state.log_history)
