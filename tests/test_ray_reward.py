"""PPO's reward ensemble on devices of its own: a Ray actor behind the reward-function interface
(rmens.integrations.ray), on a local Ray that declares two devices this machine does not have."""

import pytest
import torch
from conftest import TINY

ray = pytest.importorskip("ray")

from rmens.data.prompts import synthetic_prompts  # noqa: E402
from rmens.generation_config import GenerationConfig  # noqa: E402
from rmens.models.config import AggregationConfig  # noqa: E402
from rmens.ppo.config import PPOConfig  # noqa: E402
from rmens.ppo.trainer import PPOTrainer  # noqa: E402
from rmens.reward import EnsembleReward, placed_reward  # noqa: E402

RULE = AggregationConfig(rule="lcb", beta=1.0)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_gpus=2, num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_remote_reward_without_a_running_ray_is_one_clear_error(standardised_ensemble):
    assert not ray.is_initialized()  # runs before the module's Ray starts
    with pytest.raises(RuntimeError, match="a remote reward needs a running Ray: run with --ray"):
        with placed_reward(standardised_ensemble, RULE, devices=1):
            pass


def test_the_actor_scores_as_the_library_does_on_a_device_of_its_own(standardised_ensemble, local_ray):
    prompts, responses = ["Name a fruit.", "Say hello.", "Name a fruit."], ["apple", "hello there", "no"]
    with placed_reward(standardised_ensemble, RULE, devices=1) as remote:
        assert remote.devices in {"0", "1"}  # Ray granted it one of the declared devices
        got = remote(prompts, responses)
    want = EnsembleReward.from_folder(standardised_ensemble, RULE)(prompts, responses)
    torch.testing.assert_close(got.scores, want.scores.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.members, want.members.float(), rtol=1e-5, atol=1e-6)


def test_ppo_trains_the_same_against_the_actor_as_against_the_library(standardised_ensemble, local_ray, tmp_path):
    cfg = PPOConfig(policy=TINY, steps=2, rollout_batch_size=4, step_batch_size=4, warmup_steps=0, progress=False,
                    aggregation=RULE, generation=GenerationConfig(max_new_tokens=6, batch_size=4))
    histories = []
    for devices in (0, 1):
        with placed_reward(standardised_ensemble, RULE, devices) as reward:
            result = PPOTrainer(cfg, synthetic_prompts(8), reward, tmp_path / str(devices)).train()
        histories.append(result.history)
    local, remote = histories
    for a, b in zip(local, remote):
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-4) and a["kl"] == pytest.approx(b["kl"], rel=1e-4,
                                                                                                abs=1e-6)
