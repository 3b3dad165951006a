"""Member standardisation: computed after training, saved with the ensemble, applied before every rule,
left out where a probability or a calibration is read off raw Bradley-Terry scores, and demanded of old
ensembles of several members."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY

from rmens.data.splits import split_by_instruction
from rmens.io import write_jsonl
from rmens.models.aggregate import aggregate
from rmens.models.config import AggregationConfig, EnsembleConfig, LoraSettings
from rmens.models.ensemble import FORMAT_VERSION, build_ensemble, load_ensemble
from rmens.models.standardise import (
    MemberStandardisation,
    calibrate,
    calibration_subset,
    pair_responses,
    standardisation_from_scores,
)
from rmens.reward import EnsembleReward, UnstandardisedEnsembleError
from rmens.training.config import TrainConfig

FAST = dict(lr=2e-3, lora_lr=2e-3, batch_size=8, progress=False, warmup_ratio=0.0)
PROMPTS = ["Name a fruit.", "Name a fruit.", "Say hi.", "Tell me a colour."]
RESPONSES = ["Sure! A good choice is the apple.", "No.", "hello there, friend", "red"]


@pytest.fixture(scope="module")
def split(pairs):
    return split_by_instruction(pairs, 0.25)


def fresh(k, seed=0):
    return build_ensemble(EnsembleConfig(kind="linear", k=k, backbone=TINY, max_length=64, seed=seed)).eval()


def calibrated(ensemble, tokenizer, pairs):
    ensemble.standardisation = calibrate(ensemble, tokenizer, *pair_responses(pairs[:12]), batch_size=8)
    return ensemble


# -- the statistics -------------------------------------------------------------------------------------

def test_statistics_are_each_members_mean_and_population_sd():
    members = torch.tensor([[1.0, 2.0, 3.0, 6.0], [-4.0, 0.0, 4.0, 8.0]])
    stats = standardisation_from_scores(members)
    torch.testing.assert_close(stats.center, torch.tensor([3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(stats.scale, members.double().std(dim=1, unbiased=False))
    out = stats.apply(members)
    assert out.dtype == torch.float32 and stats.responses == 4
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.std(dim=1, unbiased=False), torch.ones(2))


def test_a_constant_member_is_a_clear_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match=r"member\(s\) \[1\] give the same reward to all 3 calibration responses"):
        standardisation_from_scores(torch.tensor([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]]))
    with pytest.raises(ValueError, match="n >= 2 responses"):
        standardisation_from_scores(torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match="scale must be positive"):
        MemberStandardisation(torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 0.0]), 10)
    stats = standardisation_from_scores(torch.tensor([[0.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="do not match the standardisation of 1 members"):
        stats.apply(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ensemble.json: standardisation must hold center, scale and responses"):
        MemberStandardisation.from_json({"center": [0.0]}, "ensemble.json: standardisation")


def test_heads_with_the_standardisation_folded_in_give_standardised_rewards():
    gen = torch.Generator().manual_seed(0)
    weight, bias, pooled = torch.randn(3, 8, generator=gen), torch.randn(3, generator=gen), torch.randn(5, 8,
                                                                                                         generator=gen)
    stats = MemberStandardisation(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
                                  torch.tensor([0.5, 3.0, 1.0], dtype=torch.float64), 10)
    folded_w, folded_b = stats.fold_into_heads(weight, bias)
    torch.testing.assert_close(pooled @ folded_w.T + folded_b, stats.apply((pooled @ weight.T + bias).T).T)


# -- computed by training, saved and loaded ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "lora", "full"])
def test_training_saves_statistics_that_reload_exactly_and_standardise_the_calibration_set(kind, split, tmp_path,
                                                                                             tiny_tokenizer):
    from rmens.training.trainer import train_ensemble

    train, _ = split
    cfg = EnsembleConfig(kind=kind, k=2, backbone=TINY, max_length=64, lora=LoraSettings(top_layers=0.5))
    result = train_ensemble(cfg, TrainConfig(max_steps=2, calibration_pairs=10, **FAST), train,
                            output_dir=tmp_path / "ens")
    trained = result.ensemble.standardisation
    assert trained is not None and trained.responses == 20
    meta = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert meta["version"] == FORMAT_VERSION and meta["standardisation"]["responses"] == 20
    summary = json.loads((tmp_path / "ens" / "train_metrics.json").read_text())
    assert summary["calibration_responses"] == 20
    loaded, _ = load_ensemble(tmp_path / "ens")
    assert torch.equal(loaded.standardisation.center, trained.center)
    assert torch.equal(loaded.standardisation.scale, trained.scale)

    # Recomputed here: the seeded subset is of training pairs, and its responses come out mean 0, sd 1.
    subset = calibration_subset(train, 10, seed=0)
    assert len(subset) == 10 and all(p in train for p in subset)
    members = EnsembleReward.from_folder(tmp_path / "ens").member_scores(*pair_responses(subset))
    torch.testing.assert_close(members.double().mean(dim=1), torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(members.double().std(dim=1, unbiased=False), torch.ones(2, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_calibration_subset_is_seeded_and_capped(pairs):
    assert calibration_subset(pairs, 8, 0) == calibration_subset(pairs, 8, 0)
    assert calibration_subset(pairs, 8, 0) != calibration_subset(pairs, 8, 1)
    assert len(calibration_subset(pairs[:5], 256, 0)) == 5


# -- the bug this fixes: per-member offsets decided the conservative rules -------------------------------

@pytest.mark.parametrize("rule", ["min", "lcb", "uwo"])
def test_conservative_rules_ignore_a_members_offset_and_scale_once_standardised(rule, tiny_tokenizer, pairs):
    ensemble = calibrated(fresh(3), tiny_tokenizer, pairs)
    aggregation = AggregationConfig(rule=rule, beta=1.0, lam=0.5)
    before = EnsembleReward(ensemble, tiny_tokenizer, aggregation)(PROMPTS, RESPONSES)
    raw_before = EnsembleReward(ensemble, tiny_tokenizer, aggregation)(PROMPTS, RESPONSES, standardise=False)
    with torch.no_grad():  # invisible to Bradley-Terry: member 1 + 3, member 2 x 4
        ensemble.heads.bias[1] += 3.0
        ensemble.heads.weight[2] *= 4.0
        ensemble.heads.bias[2] *= 4.0
    raw_after = EnsembleReward(ensemble, tiny_tokenizer, aggregation)(PROMPTS, RESPONSES, standardise=False)
    assert not torch.allclose(raw_after.scores, raw_before.scores, atol=1e-3), "raw rules see the offset"
    recalibrated = calibrated(ensemble, tiny_tokenizer, pairs)
    after = EnsembleReward(recalibrated, tiny_tokenizer, aggregation)(PROMPTS, RESPONSES)
    torch.testing.assert_close(after.members, before.members, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after.scores, before.scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after.scores, aggregate(after.members, rule, beta=1.0, lam=0.5))


# -- old ensembles and the calibrate command ----------------------------------------------------------------

def test_one_member_without_statistics_warns_and_uses_raw_scores(tmp_path, tiny_tokenizer, caplog):
    fresh(1).save(tmp_path / "old", tiny_tokenizer)
    meta = json.loads((tmp_path / "old" / "ensemble.json").read_text())
    assert "standardisation" not in meta
    (tmp_path / "old" / "ensemble.json").write_text(json.dumps({**meta, "version": 1}))  # as saved before
    assert load_ensemble(tmp_path / "old")[0].standardisation is None
    with caplog.at_level(logging.WARNING, logger="rmens.reward"):
        reward = EnsembleReward.from_folder(tmp_path / "old")
    assert "saved without standardisation statistics" in caplog.text and "rmens.cli calibrate" in caplog.text
    out = reward(PROMPTS, RESPONSES)
    torch.testing.assert_close(out.scores, reward.member_scores(PROMPTS, RESPONSES, standardise=False)[0])


def test_several_members_without_statistics_is_a_one_line_error_until_calibrated(tmp_path, tiny_tokenizer, pairs,
                                                                                 capsys):
    from rmens.cli import main

    folder = tmp_path / "old"
    fresh(2).save(folder, tiny_tokenizer)
    with pytest.raises(UnstandardisedEnsembleError) as err:
        EnsembleReward.from_folder(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and "without member standardisation statistics" in message
    assert f"python -m rmens.cli calibrate {folder} --pairs" in message
    assert EnsembleReward.from_folder(folder, allow_unstandardised=True).standardisation is None

    heads = (folder / "heads.safetensors").read_bytes()
    write_jsonl(tmp_path / "train.jsonl", (p.to_dict() for p in pairs))
    assert main(["calibrate", str(folder), "--pairs", str(tmp_path / "train.jsonl"), "--max-pairs", "6"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["responses"] == 12
    meta = json.loads((folder / "ensemble.json").read_text())
    assert meta["version"] == FORMAT_VERSION and meta["standardisation"]["responses"] == 12
    assert (folder / "heads.safetensors").read_bytes() == heads
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    reward = EnsembleReward.from_folder(folder)
    expected = calibrate(load_ensemble(folder)[0], tiny_tokenizer, *pair_responses(calibration_subset(pairs, 6, 0)))
    assert reward.standardisation.to_json() == expected.to_json()


def test_calibrate_command_errors_are_one_line(tmp_path, capsys, pairs):
    from rmens.cli import main

    write_jsonl(tmp_path / "train.jsonl", (p.to_dict() for p in pairs[:4]))
    assert main(["calibrate", str(tmp_path / "missing"), "--pairs", str(tmp_path / "train.jsonl")]) == 2
    assert "is not a saved ensemble (no ensemble.json)" in capsys.readouterr().err
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "ensemble.json").write_text(json.dumps({"format": "rmens-ensemble", "version": 99}))
    assert main(["calibrate", str(tmp_path / "future"), "--pairs", str(tmp_path / "train.jsonl")]) == 2
    assert "format version 99 is newer" in capsys.readouterr().err


# -- where raw scores stay: a judge's probabilities, accuracy and calibration ------------------------------

def with_statistics(ensemble):
    """Statistics far from identity, so raw and standardised scores differ plainly."""
    ensemble.standardisation = MemberStandardisation(torch.tensor([3.0, -2.0], dtype=torch.float64),
                                                     torch.tensor([0.25, 4.0], dtype=torch.float64), 100)
    return ensemble


def test_reward_model_judge_probabilities_stay_on_the_raw_bradley_terry_scale(tmp_path, tiny_tokenizer):
    from rmens.evaluation.judges import RewardModelJudge

    with_statistics(fresh(2)).save(tmp_path / "judge", tiny_tokenizer)
    judge = RewardModelJudge(tmp_path / "judge")
    reward = EnsembleReward.from_folder(tmp_path / "judge")
    prompts, a, b = PROMPTS[:2], RESPONSES[:2], RESPONSES[2:]
    raw_a = reward.member_scores(prompts, a, standardise=False).mean(dim=0)
    raw_b = reward.member_scores(prompts, b, standardise=False).mean(dim=0)
    torch.testing.assert_close(judge.compare(prompts, a, b), torch.sigmoid(raw_b - raw_a))
    standardised = torch.sigmoid(reward(prompts, b).scores - reward(prompts, a).scores)
    assert not torch.allclose(judge.compare(prompts, a, b), standardised, atol=1e-3)


def test_reward_model_metrics_use_raw_margins(tmp_path, tiny_tokenizer, pairs):
    from rmens.evaluation.reward_model import evaluate_reward_model
    from rmens.evaluation.rm_metrics import calibration

    with_statistics(fresh(2)).save(tmp_path / "rm", tiny_tokenizer)
    metrics = evaluate_reward_model(tmp_path / "rm", pairs[:8])
    reward = EnsembleReward.from_folder(tmp_path / "rm")
    prompts = [p.prompt for p in pairs[:8]]
    margins = (reward.member_scores(prompts, [p.chosen for p in pairs[:8]], standardise=False)
               - reward.member_scores(prompts, [p.rejected for p in pairs[:8]], standardise=False))
    assert metrics["ece"] == pytest.approx(calibration(margins.mean(dim=0))["ece"])


# -- the served model, retrain's scoring, PPO's value model -----------------------------------------------

def test_pyfunc_member_columns_are_the_standardised_members(tmp_path, tiny_tokenizer):
    import pandas as pd

    from tasks.registry.reward_model_code import RewardEnsembleModel

    with_statistics(fresh(2)).save(tmp_path / "ens", tiny_tokenizer)
    model = RewardEnsembleModel()
    model.load_context(SimpleNamespace(artifacts={"ensemble": str(tmp_path / "ens")},
                                       model_config={"aggregation": {"rule": "min"}}))
    frame = model.predict(None, pd.DataFrame({"prompt": PROMPTS, "response": RESPONSES}))
    reward = EnsembleReward.from_folder(tmp_path / "ens", AggregationConfig(rule="min"))
    members = reward.member_scores(PROMPTS, RESPONSES)
    torch.testing.assert_close(torch.tensor(frame[["member_0", "member_1"]].to_numpy().T, dtype=torch.float32),
                               members)
    torch.testing.assert_close(torch.tensor(frame["reward"].to_numpy(), dtype=torch.float32),
                               members.min(dim=0).values)


def test_retrain_scores_accuracy_of_the_served_reward_and_ece_of_raw_margins(tmp_path, tiny_tokenizer, pairs,
                                                                            monkeypatch):
    import tasks.registry.model as registry_model
    from rmens.evaluation.rm_metrics import calibration, pairwise_accuracy
    from tasks.registry import score_registered

    model = tmp_path / "model"
    with_statistics(fresh(2)).save(model / "artifacts" / "ensemble", tiny_tokenizer)
    (model / "MLmodel").write_text("flavors:\n  python_function:\n    model_config:\n      aggregation: {rule: min}\n")
    monkeypatch.setattr(registry_model, "download_ensemble", lambda uri, dst: model / "artifacts" / "ensemble")
    held = pairs[:8]
    scores = score_registered("models:/rm/1", held)
    reward = EnsembleReward.from_folder(model / "artifacts" / "ensemble", AggregationConfig(rule="min"))
    prompts = [p.prompt for p in held]
    chosen, rejected = [p.chosen for p in held], [p.rejected for p in held]
    served = reward(prompts, chosen).scores - reward(prompts, rejected).scores
    raw = (reward.member_scores(prompts, chosen, standardise=False)
           - reward.member_scores(prompts, rejected, standardise=False)).mean(dim=0)
    assert scores["accuracy"] == pairwise_accuracy(served)
    assert scores["ece"] == pytest.approx(calibration(raw)["ece"], abs=1e-6)

    fresh(2).save(model / "artifacts" / "ensemble", tiny_tokenizer)  # registered before the statistics
    with pytest.raises(UnstandardisedEnsembleError, match="models:/rm/1 was registered without member"):
        score_registered("models:/rm/1", held)


def test_value_model_from_the_reward_starts_on_the_standardised_scale(tmp_path, tiny_tokenizer):
    from rmens.ppo.config import PPOConfig
    from rmens.ppo.trainer import _value_from_reward

    ensemble = with_statistics(fresh(2))
    ensemble.save(tmp_path / "rm", tiny_tokenizer)
    _, head = _value_from_reward(PPOConfig(policy=TINY), tmp_path / "rm", None)
    weight, bias = ensemble.standardisation.fold_into_heads(ensemble.heads.weight.detach(),
                                                            ensemble.heads.bias.detach())
    torch.testing.assert_close(head.weight[0], weight.mean(dim=0))
    torch.testing.assert_close(head.bias[0], bias.mean())
