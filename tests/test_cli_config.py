"""`rmens run --config FILE`: the file is layered over the preset at every depth, then --set on top."""

import argparse

import pytest


def _args(tmp_path, text: str, *sets: str) -> argparse.Namespace:
    config = tmp_path / "over.yaml"
    config.write_text(text)
    return argparse.Namespace(preset="smoke", config=str(config), set=list(sets))


def test_a_nested_override_keeps_the_presets_other_nested_values(tmp_path):
    from flows.cli import pipeline_config, preset_data

    preset = preset_data("smoke")
    config = pipeline_config(_args(tmp_path, "ppo: {steps: 3, generation: {max_new_tokens: 5}}\n"))
    assert config.ppo.steps == 3 and config.ppo.generation.max_new_tokens == 5
    assert config.ppo.lr == preset["ppo"]["lr"]  # a sibling of the override
    assert config.ppo.generation.temperature == preset["ppo"]["generation"]["temperature"]  # one level deeper
    assert config.ppo.generation.batch_size == preset["ppo"]["generation"]["batch_size"]


def test_set_applies_over_the_file_and_both_are_validated(tmp_path):
    from pydantic import ValidationError

    from flows.cli import pipeline_config

    assert pipeline_config(_args(tmp_path, "ppo: {steps: 3}\n", "ppo.steps=4")).ppo.steps == 4
    with pytest.raises(ValidationError, match="steps"):
        pipeline_config(_args(tmp_path, "ppo: {steps: 0}\n"))


def test_a_derived_config_is_validated_at_once():
    """derive validates what it makes, so an inconsistent combination fails where it is made, not when a
    saved ensemble is reloaded."""
    from pydantic import ValidationError

    from rmens.arms import Arm, run_seed
    from rmens.config import derive
    from rmens.models.config import EnsembleConfig

    frozen = EnsembleConfig(kind="linear", k=3, freeze_backbone=True)
    with pytest.raises(ValidationError, match="freeze_backbone"):
        derive(frozen, kind="lora")
    with pytest.raises(ValidationError, match="freeze_backbone"):
        Arm(kind="lora", k=5).ensemble_config(frozen, 0)
    single = Arm(kind="single").ensemble_config(frozen, 2)
    assert single.model_dump() == {**frozen.model_dump(), "k": 1, "seed": run_seed(frozen.seed, "single", 2)}


def test_arms_rules_and_selections_are_typed_with_one_label_and_path_each():
    from rmens.pipeline.config import load_preset

    config = load_preset("smoke")
    arms = {arm.label: arm for arm in config.arms}
    assert list(arms) == ["single", "linear-k3", "lora-k3"]
    assert [arm.run_label(run) for arm, run in config.trained_runs()] == ["single-r0", "linear-k3-r0", "lora-k3-r0"]
    assert [r.name for r in arms["single"].rules(config.rules)] == ["mean"]
    assert [r.name for r in arms["lora-k3"].rules(config.rules)] == ["mean", "min", "lcb1", "uwo0.5"]
    assert [(p.arm, p.rule.name, p.run_label(0)) for p in config.ppo_arms] == [
        ("single", "mean", "single/mean-r0"), ("linear-k3", "mean", "linear-k3/mean-r0")]
    picks = {s.label: s for s in config.selections()}
    assert picks["bon:lora-k3-r0/lcb1:n4"].file_name == "lora-k3-r0_lcb1_n4.jsonl"
    assert len(picks) == 1 + 4 + 4  # single under the mean only, each ensemble under every rule
    more = load_preset("smoke", ["arms=[{kind: single, runs: 2}, {kind: linear, k: 3}]"])
    assert [s.label for s in more.selections() if s.arm.kind == "single"] == ["bon:single-r0/mean:n4",
                                                                               "bon:single-r1/mean:n4"]


def test_a_missing_data_folder_is_reported_before_any_work(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from rmens.data.loaders import check_sources
    from rmens.pipeline.config import load_preset

    monkeypatch.delenv("RMENS_DATA_DIR", raising=False)
    sections = load_preset("cpu").data_sources()
    with pytest.raises(ValueError, match="data.source=alpaca_eval: .*RMENS_DATA_DIR"):
        check_sources(sections)
    monkeypatch.setenv("RMENS_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=f"no data folder at {tmp_path / 'alpaca_eval'}"):
        check_sources(sections)
    # The command: one line and exit 2, before the model conversion or a Prefect server start.
    env = {k: v for k, v in os.environ.items() if k != "RMENS_DATA_DIR"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "cpu", "--set",
                           f"project_dir={tmp_path / 'p'}"], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "data.source=alpaca_eval" in done.stderr and not (tmp_path / "p").exists()


def test_a_model_that_cannot_be_found_is_reported_in_one_line(tmp_path, monkeypatch):
    from rmens.models.context import check_max_length

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="'no-such-org/no-such-model' is not a built-in alias"):
        check_max_length("no-such-org/no-such-model", 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        check_max_length(str(tmp_path / "empty"), 64)


def test_servers_that_do_not_answer_are_reported_before_any_work(monkeypatch):
    import socket

    from flows.services import check_servers

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    with pytest.raises(ValueError, match="PREFECT_API_URL=.* does not answer"):
        check_servers()
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI=.* does not answer"):
        check_servers()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")  # a file store needs no server
    check_servers()


def test_the_golds_held_out_share_is_one_setting():
    """gold.data.val_fraction alone decides the gold pairs kept back to measure agreement: 0.2 unless set, also
    when a config writes a gold.data section without it (as the smoke preset does), and the gold's data stage
    gets it as written."""
    from pydantic import ValidationError

    from rmens.pipeline.config import GoldConfig, load_preset
    from rmens.pipeline.plan import train_gold

    assert GoldConfig().data.val_fraction == 0.2
    assert "val_fraction" not in load_preset("smoke").model_dump(exclude_unset=True)["gold"]["data"]
    assert load_preset("smoke").gold.data.val_fraction == 0.2
    with pytest.raises(ValidationError, match="gold.data.val_fraction"):
        load_preset("smoke", ["gold.data.val_fraction=0"])
    calls = []
    config = load_preset("smoke", ["gold.data.val_fraction=0.3"])
    train_gold(lambda step, label, /, tags=None, **inputs: calls.append(inputs), config)
    assert calls[0]["data"].val_fraction == 0.3
