"""rmens.memory: each step's accelerator memory, estimated from model configs before anything runs, and a plan
that cannot fit one device refused in one line."""

import json
import subprocess
import sys

import pytest
from conftest import TINY

from rmens.config import apply_overrides, derive
from rmens.memory import FROZEN_BYTES, GIB, TRAINED_BYTES, PlanDoesNotFit, check_fit, estimates, parameter_count
from rmens.models.backbone import load_backbone, load_policy
from rmens.pipeline.config import PipelineConfig
from rmens.pipeline.plan import run_pipeline
from rmens.presets import preset_data
from rmens.steps import Store
from rmens.steps.graph import record

# Qwen2.5-7B-Instruct's published architecture: a 7.6B model described by its config alone (no weights).
QWEN_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
           "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "vocab_size": 152064, "max_position_embeddings": 32768, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen7b")
    (folder / "config.json").write_text(json.dumps(QWEN_7B))
    return str(folder)


def plan(tmp_path, *overrides):
    data = apply_overrides(preset_data("smoke"), [f"project_dir={tmp_path}", *overrides])
    return record(run_pipeline, Store.of_project(tmp_path), PipelineConfig.model_validate(data))[0]


def test_parameter_counts_come_from_the_config_alone(qwen):
    assert parameter_count(TINY) == sum(p.numel() for p in load_policy(TINY).parameters())
    assert parameter_count(TINY, head=False) == sum(p.numel() for p in load_backbone(TINY).parameters())
    assert 7.6e9 < parameter_count(qwen) < 7.7e9  # Qwen2.5-7B: 7.62B, of which its untied head 0.55B
    assert 7.0e9 < parameter_count(qwen, head=False) < 7.1e9


def test_each_step_is_estimated_from_what_it_trains_and_holds(qwen, tmp_path):
    p, body = parameter_count(qwen), parameter_count(qwen, head=False)  # policies have a head, reward models not
    needs = estimates(plan(tmp_path, f"ensemble.backbone={qwen}", f"policy={qwen}",
                           "arms=[{kind: single}, {kind: full, k: 3}]",
                           "ppo_arms=[single]", "ppo.use_lora=false", "ppo.value_model=reward"))
    margin = needs["train_ensemble:single-r0"].gib / (body * TRAINED_BYTES / GIB)
    assert margin == pytest.approx(1.25)
    # a full ensemble: each member step trains one backbone; the assembly holds the k of them for inference
    assert needs["train_member:full-k3-r0/m2"].gib == pytest.approx(needs["train_ensemble:single-r0"].gib)
    assert needs["train_ensemble:full-k3-r0"].gib * GIB == pytest.approx(3 * body * FROZEN_BYTES * margin)
    assert "3 x 7.07B frozen" in needs["train_ensemble:full-k3-r0"].describe()
    frozen = estimates(plan(tmp_path, f"ensemble.backbone={qwen}", "arms=[{kind: linear, k: 3}]", "ppo_arms=[]",
                            "ensemble.freeze_backbone=true"))
    assert frozen["train_ensemble:linear-k3-r0"].gib * GIB == pytest.approx(body * FROZEN_BYTES * margin)
    assert needs["score:full-k3-r0"].gib * GIB == pytest.approx(3 * body * FROZEN_BYTES * margin)
    # PPO without LoRA: the policy trained and its reference, a value model trained from the reward model, the
    # reward model frozen, and the smoke preset's tiny gold
    ppo = needs["ppo:single/mean-r0"]
    assert ppo.gib * GIB / margin == pytest.approx(p * (TRAINED_BYTES + FROZEN_BYTES)
                                                   + body * (TRAINED_BYTES + FROZEN_BYTES), rel=1e-3)
    assert "value model" in ppo.describe() and "reference" in ppo.describe()
    assert "prepare_data:arms" not in needs and "report:report" not in needs  # no model held


def test_a_plan_that_cannot_fit_one_device_is_refused_naming_the_step(qwen, tmp_path):
    nodes = plan(tmp_path, f"ensemble.backbone={qwen}", f"policy={qwen}")
    with pytest.raises(PlanDoesNotFit, match=r"train_ensemble:single-r0 needs about 131\.\d GiB \(1 x 7\.07B trained .*"
                                             r"more than one 80 GiB device holds: give it 2 devices to shard over"):
        check_fit(nodes, 80)
    check_fit(nodes, 139)  # an H200 (139 GiB usable) holds every step


def test_a_training_step_given_devices_is_estimated_per_shard(qwen, tmp_path):
    """FSDP2 splits a training step's weights, gradients and optimizer state over its devices: the 7B reward model
    that does not fit one 80 GiB device fits two; a step that does not shard is told so."""
    from rmens.steps.resources_config import StepResources, call_devices

    nodes = plan(tmp_path, f"ensemble.backbone={qwen}", f"policy={qwen}")
    resources = {"train_ensemble": StepResources(devices=2)}
    found = estimates(nodes, lambda node: call_devices(node.name, node.step, resources))
    alone = estimates(nodes)["train_ensemble:single-r0"]
    assert found["train_ensemble:single-r0"].devices == 2
    assert found["train_ensemble:single-r0"].gib == pytest.approx(alone.gib / 2)
    assert "on each of 2 devices (FSDP2)" in found["train_ensemble:single-r0"].describe()
    ppo = {name: e for name, e in found.items() if name.startswith("ppo:")}
    assert ppo and all(e.devices == 1 for e in ppo.values())  # PPO does not shard, whatever it is given
    with pytest.raises(PlanDoesNotFit, match=r"ppo:\S+ needs about 68.\d GiB .* only training steps shard"):
        check_fit(nodes, 67, lambda node: call_devices(node.name, node.step, resources))  # training fits 67 on 2


def test_the_cli_refuses_before_anything_runs_and_the_dry_run_shows_the_estimates(qwen, tmp_path):
    project = tmp_path / "project"
    common = [sys.executable, "-m", "flows.cli", "run", "--preset", "smoke", "--set", f"project_dir={project}",
              "--set", f"ensemble.backbone={qwen}", "--set", f"policy={qwen}", "--device-memory-gib", "80"]
    refused = subprocess.run(common, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and not project.exists()
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one line
    assert "train_ensemble:single-r0 needs about 131" in refused.stderr
    dry = subprocess.run([*common, "--dry-run"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and not project.exists()
    line = next(x for x in dry.stdout.splitlines() if x.strip().startswith("train_ensemble:single-r0"))
    assert "1 device(s)" in line and "needs 131" in line and line.endswith("> device")
    assert dry.stdout.strip().endswith("some need more than one 80 GiB device")


def test_the_experiments_ppo_is_estimated_as_the_pipelines_and_an_actors_reward_leaves_its_device(qwen):
    from rmens.models.config import EnsembleConfig
    from rmens.ppo.config import PPOConfig
    from rmens.steps import Output
    from rmens.steps.contract import DECLARED
    from rmens.steps.graph import Node

    body = parameter_count(qwen, head=False)
    train = Node("train:a", DECLARED["train_ensemble"], "a", None, {"ensemble": EnsembleConfig(backbone=qwen)}, "k1",
                 ())
    reward = Output(step="train_ensemble", key="k1", path="/nowhere")
    ppo = PPOConfig(policy=qwen)  # LoRA, value head: the policy frozen under its adapters and the reward

    def need(**settings):
        node = Node("ppo:a", DECLARED["ppo"], "a", None, {"ppo": derive(ppo, **settings), "reward": reward},
                    "k2", ("train:a",))
        return estimates({"train:a": train, "ppo:a": node})["ppo:a"]

    assert need().gib == pytest.approx((parameter_count(qwen) + body) * FROZEN_BYTES * 1.25 / GIB)
    assert need(reward_devices=1).gib == pytest.approx(parameter_count(qwen) * FROZEN_BYTES * 1.25 / GIB)


def test_the_gpu_preset_fits_a_node_of_eight_80_gib_devices(qwen, tmp_path):
    """Its reward models train sharded over 4 devices each and every other step fits one; no call asks for more
    devices than the node has. (The 7B configs stand in for the hub ids, which need a network.)"""
    from flows.cli import devices_of

    data = apply_overrides(preset_data("gpu"), [f"project_dir={tmp_path}", f"ensemble.backbone={qwen}",
                                               f"policy={qwen}", "data.source=synthetic"])
    config = PipelineConfig.model_validate(data)
    nodes = record(run_pipeline, Store.of_project(tmp_path), config)[0]
    check_fit(nodes, 80, devices_of(config.resources))
    found = estimates(nodes, devices_of(config.resources))
    trained = {name: e for name, e in found.items() if name.startswith("train_ensemble:")}
    assert trained and all(e.devices == 4 and 30 < e.gib < 35 for e in trained.values())
    assert max(devices_of(config.resources)(node) for node in nodes.values()) <= 8
    with pytest.raises(PlanDoesNotFit, match="train_ensemble:single-r0 needs about 131"):
        check_fit(nodes, 80)  # the same plan unsharded
