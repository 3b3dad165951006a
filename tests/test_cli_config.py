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
