import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY

from rmens.data.splits import split_by_instruction
from rmens.models.config import EnsembleConfig, LoraSettings
from rmens.models.ensemble import load_ensemble
from rmens.training import trainer as trainer_module
from rmens.training.config import TrainConfig
from rmens.training.trainer import bradley_terry_loss, train_ensemble

FAST = dict(lr=2e-3, lora_lr=2e-3, batch_size=8, progress=False, warmup_ratio=0.0)


def test_bradley_terry_loss_against_hand_computed_values():
    rewards = torch.tensor([[2.0, 0.0, 1.0, 0.0]])  # one member; chosen (2, 0), rejected (1, 0)
    targets = torch.tensor([1.0, 0.5])
    loss, per_member = bradley_terry_loss(rewards, targets, torch.ones(1, 2))
    expected = (-math.log(torch.sigmoid(torch.tensor(1.0)).item()) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    centred, _ = bradley_terry_loss(rewards, targets, torch.ones(1, 2), center_coef=0.1)
    assert centred.item() == pytest.approx(expected + 0.1 * (9 + 0) / 2, rel=1e-6)


def test_member_weights_mask_gradients():
    rewards = torch.zeros(2, 4, requires_grad=True)
    weights = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    loss, _ = bradley_terry_loss(rewards, torch.ones(2), weights)
    loss.backward()
    assert rewards.grad[0, 1] == 0 and rewards.grad[1, 0] == 0
    assert rewards.grad[1, 1] == pytest.approx(2 * rewards.grad[0, 0].item())


def test_non_finite_loss_stops_training():
    with pytest.raises(FloatingPointError, match="non-finite"):
        bradley_terry_loss(torch.tensor([[float("nan"), 0.0]]), torch.ones(1), torch.ones(1, 1))


@pytest.fixture(scope="module")
def split(pairs):
    return split_by_instruction(pairs, 0.25)


@pytest.mark.parametrize("kind", ["full", "linear", "lora"])
def test_training_learns_and_saves(kind, split, tmp_path):
    train, val = split
    cfg = EnsembleConfig(kind=kind, k=2, backbone=TINY, max_length=64, lora=LoraSettings(top_layers=0.5))
    log = []
    result = train_ensemble(cfg, TrainConfig(epochs=2, eval_every=4, **FAST), train, val, tmp_path / "ens",
                            log_fn=lambda step, m: log.append((step, m)))
    assert result.metrics["accuracy"] >= 0.9
    assert all(a >= 0.9 for a in result.metrics["member_accuracy"])
    assert result.metrics["length_rule_accuracy"] == 1.0 and result.metrics["n_longer_lost"] == 0  # synthetic data
    # the phases one after another on one step axis; a full ensemble's members each on their own
    curves = [stage.history for stage in result.stages.values()] if kind == "full" else [_history(result)]
    for curve in curves:
        losses = [v for h in curve for k, v in h.items() if k.endswith("/loss")]
        assert losses[-1] < losses[0]
    periodic = "val_accuracy_m1" if kind == "full" else "val_accuracy"  # a member is evaluated alone
    assert any(periodic in m for step, m in log if step < result.steps), "periodic evaluation reached the log callback"
    assert set(result.stages) == {"lora": {"stage1", "stage2"}, "full": {"m0", "m1"}}.get(kind, {"train"})
    saved = json.loads((tmp_path / "ens" / "train_metrics.json").read_text())
    assert saved["metrics"]["accuracy"] == result.metrics["accuracy"]
    loaded, _ = load_ensemble(tmp_path / "ens")
    assert loaded.kind == kind


def _history(result):
    return [h for stage in result.stages.values() for h in stage.history]


def test_training_is_deterministic_for_a_seed(split):
    train, val = split
    cfg = EnsembleConfig(kind="linear", k=2, backbone=TINY, max_length=64)
    runs = [train_ensemble(cfg, TrainConfig(max_steps=4, **FAST), train, val) for _ in range(2)]
    assert _history(runs[0]) == _history(runs[1])
    other = train_ensemble(cfg, TrainConfig(max_steps=4, **{**FAST, "seed": 1}), train, val)
    assert _history(other) != _history(runs[0])


def test_gradient_accumulation_matches_large_batch_weights(split, tmp_path):
    train, _ = split
    cfg = EnsembleConfig(kind="linear", k=2, backbone=TINY, max_length=64)
    base = {**FAST, "schedule": "constant", "max_grad_norm": None}
    train_ensemble(cfg, TrainConfig(max_steps=3, **{**base, "batch_size": 8}), train[:24], output_dir=tmp_path / "a")
    train_ensemble(cfg, TrainConfig(max_steps=3, grad_accum=2, **{**base, "batch_size": 4}), train[:24],
                   output_dir=tmp_path / "b")
    a, _ = load_ensemble(tmp_path / "a")
    b, _ = load_ensemble(tmp_path / "b")
    torch.testing.assert_close(a.heads.weight, b.heads.weight, atol=1e-5, rtol=1e-4)
    pa, pb = dict(a.backbone.named_parameters()), dict(b.backbone.named_parameters())
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], atol=1e-5, rtol=1e-4)


def test_lora_stage_two_keeps_the_stage_one_backbone(split, monkeypatch):
    train, val = split
    captured = {}
    real_to_lora = trainer_module.to_lora

    def spy(stage1, cfg):
        captured.update({k: v.clone() for k, v in stage1.backbone.state_dict().items()})
        captured["heads"] = stage1.heads.weight.detach().clone()
        return real_to_lora(stage1, cfg)

    monkeypatch.setattr(trainer_module, "to_lora", spy)
    cfg = EnsembleConfig(kind="lora", k=2, backbone=TINY, max_length=64, lora=LoraSettings(top_layers=0.5))
    result = train_ensemble(cfg, TrainConfig(max_steps=3, **FAST), train, val)
    assert result.stages["stage1"].steps == 3 and result.stages["stage2"].steps == 3
    final = result.ensemble
    plain = {k.replace(".base_layer.", "."): v for k, v in final.backbone.state_dict().items() if "lora_" not in k}
    assert plain.keys() == (captured.keys() - {"heads"})
    for name, value in plain.items():
        assert torch.equal(value, captured[name]), f"stage 2 changed frozen backbone weight {name}"
    assert not torch.equal(final.heads.weight, captured["heads"]), "stage 2 trains the heads"
    lora_b = [p for n, p in final.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "stage 2 trains the adapters"


def test_max_length_beyond_context_is_an_error(split):
    train, _ = split
    cfg = EnsembleConfig(kind="linear", k=1, backbone=TINY, max_length=1024)
    with pytest.raises(ValueError, match="exceeds the context"):
        train_ensemble(cfg, TrainConfig(max_steps=1, **FAST), train)


def test_two_cpu_processes_match_one_process(tmp_path):
    """accelerate launch with 2 CPU processes x batch 2 == 1 process x batch 4 (same global batch)."""
    config = tmp_path / "job.yaml"
    config.write_text(
        "data: {source: synthetic, max_pairs: 64, val_fraction: 0.2}\n"
        f"ensemble: {{kind: linear, k: 2, max_length: 64, backbone: {TINY}}}\n"
        "train: {lr: 0.001, max_steps: 4, progress: false, warmup_ratio: 0.0, schedule: constant}\n"
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "29517"]
    two = subprocess.run(launcher + ["-m", "rmens.cli", "train", "--config", str(config), "--set", "train.batch_size=2",
                                     "--output", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "rmens.cli", "train", "--config", str(config), "--set",
                          "train.batch_size=4", "--output", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    h1 = json.loads((tmp_path / "one" / "train_metrics.json").read_text())["history"]["train"]
    h2 = json.loads((tmp_path / "two" / "train_metrics.json").read_text())["history"]["train"]
    assert len(h1) == len(h2) == 4
    for a, b in zip(h1, h2):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-4)
    m1, _ = load_ensemble(tmp_path / "one")
    m2, _ = load_ensemble(tmp_path / "two")
    torch.testing.assert_close(m1.heads.weight, m2.heads.weight, atol=1e-4, rtol=1e-3)


def test_cli_train_refuses_a_users_folder_before_any_work(tmp_path, capsys):
    from rmens.cli import main

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    config = tmp_path / "job.yaml"
    config.write_text(f"data: {{source: synthetic, max_pairs: 16}}\nensemble: {{backbone: {TINY}, max_length: 32}}\n")
    assert main(["train", "--config", str(config), "--output", str(victim)]) == 2
    assert "not a saved rmens ensemble" in capsys.readouterr().err
    assert [p.name for p in victim.iterdir()] == ["notes.txt"]
