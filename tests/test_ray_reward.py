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


def test_inside_a_step_granted_its_own_and_its_rewards_devices_the_actor_takes_the_last(standardised_ensemble,
                                                                                        local_ray):
    """A PPO step asks for its device and its reward's together (two PPO steps then never each hold one device
    while waiting for a second): the actor is placed on the step's last granted device."""
    from rmens.integrations.ray import RemoteReward

    @ray.remote(num_gpus=2, num_cpus=0)
    def step():
        reward = RemoteReward(standardised_ensemble, RULE, devices=1)
        try:
            return [str(i) for i in ray.get_gpu_ids()], reward.devices
        finally:
            reward.close()

    granted, actor = ray.get(step.remote(), timeout=300)
    assert sorted(granted) == ["0", "1"] and actor == granted[-1]


def test_a_step_asking_for_more_devices_than_any_node_has_is_refused_before_anything_runs(local_ray):
    from tasks.runtime.placement import check_requests, largest_node, ray_request

    largest = largest_node()
    assert largest["GPU"] == 2
    check_requests([("ppo:a", 2)], largest)
    with pytest.raises(ValueError, match="ppo:a asks for 3 devices but the largest Ray node has 2"):
        check_requests([("ppo:a", 3)], largest)
    assert ray_request(1, 4, largest)["num_gpus"] == 1 and ray_request(0, 4, largest)["num_cpus"] == 1


def test_moving_the_reward_to_an_actor_does_not_block_resuming_a_run():
    """reward_devices is in no key, so a stopped run continues in the same folder with another value."""
    from rmens.config import flatten
    from rmens.ppo.trainer import resume_conflicts

    saved = {"config": flatten(PPOConfig(policy=TINY)), "step": 1}
    assert resume_conflicts(saved, PPOConfig(policy=TINY, reward_devices=1), None) == []
    assert resume_conflicts(saved, PPOConfig(policy=TINY, lr=1e-3), None) != []


@pytest.mark.parametrize("extra, message", [
    ([], "ppo.reward_devices=1 puts the reward ensemble in a Ray actor: run with --ray ADDRESS"),
    (["--ray", "local", "--set", "resources={ppo: {devices: 0}}"],
     "resources: ppo runs PPO without devices, so its reward actor"),
])
def test_a_reward_actor_that_could_never_be_placed_is_refused_before_anything_runs(tmp_path, monkeypatch, extra,
                                                                                   message):
    import subprocess
    import sys

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--set",
                           f"project_dir={tmp_path / 'p'}", "--set", "ppo.reward_devices=1", *extra, "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and not (tmp_path / "p").exists()
