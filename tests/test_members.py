"""rmens.training.members: a full ensemble trained as k members on their own and assembled, in one call or as k
member steps and an assembly step, with the same saved ensemble either way."""

import json
import shutil

import pytest
import torch
from conftest import TINY

from rmens.config import apply_overrides, derive
from rmens.data.splits import split_by_instruction
from rmens.models.config import EnsembleConfig
from rmens.models.ensemble import init_heads, init_member_head, load_ensemble
from rmens.models.standardise import MemberStandardisation
from rmens.reward import EnsembleReward
from rmens.steps import Store
from rmens.training.config import TrainConfig
from rmens.training.members import (
    TrainedMember,
    assemble,
    build_member,
    load_members,
    save_member,
    train_member,
)
from rmens.training.trainer import StageResult, train_ensemble

# Two optimizer steps, a periodic evaluation between them, and clipping that bites (the members' own).
TRAIN = TrainConfig(lr=2e-3, batch_size=8, max_steps=2, eval_every=1, max_grad_norm=0.5, warmup_ratio=0.0,
                    calibration_pairs=16, progress=False)
PROMPTS = ["Name a fruit.", "Why is the sky blue?", "Say hello."]
RESPONSES = ["An apple.", "Because of Rayleigh scattering of sunlight.", "Hello!"]


@pytest.fixture(scope="module")
def split(pairs):
    return split_by_instruction(pairs[:64], 0.25)


@pytest.fixture(scope="module")
def dropout_backbone(tmp_path_factory, tiny_path):
    """The tiny Llama with attention dropout, so that each member's training draws on the global generators."""
    folder = tmp_path_factory.mktemp("dropout") / "tiny"
    shutil.copytree(tiny_path, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.2}))
    return str(folder)


@pytest.fixture(scope="module")
def full(dropout_backbone):
    return EnsembleConfig(kind="full", k=2, backbone=dropout_backbone, max_length=64, seed=3)


def assert_same_ensemble(a, b):
    """Weight for weight, standardisation and score for score."""
    ea, _ = load_ensemble(a)
    eb, _ = load_ensemble(b)
    sa, sb = ea.state_dict(), eb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[name], sb[name]) for name in sa)
    assert ea.standardisation.to_json() == eb.standardisation.to_json()
    scores = [EnsembleReward.from_folder(folder).member_scores(PROMPTS, RESPONSES) for folder in (a, b)]
    assert torch.equal(*scores)
    meta = [json.loads((folder / "ensemble.json").read_text()) for folder in (a, b)]
    assert meta[0]["kind"] == meta[1]["kind"] == "full" and meta[0]["files"] == meta[1]["files"]
    metrics = [json.loads((folder / "train_metrics.json").read_text()) for folder in (a, b)]
    for key in ("metrics", "steps", "history", "calibration_responses"):
        assert json.dumps(metrics[0][key]) == json.dumps(metrics[1][key]), key  # as JSON: nan equals nan


def test_a_member_head_is_its_row_of_the_ensembles_heads():
    heads = init_heads(64, 4, seed=5)
    for i in range(4):
        assert torch.equal(init_member_head(64, 5, i).weight[0], heads.weight[i])


def test_one_call_equals_members_trained_apart_and_assembled(full, split, tmp_path):
    train, val = split
    log = []
    whole = train_ensemble(full, TRAIN, train, val, tmp_path / "whole", log_fn=lambda step, m: log.append(m))
    assert set(whole.stages) == {"m0", "m1"} and whole.steps == 2 and whole.metrics["accuracy"] > 0
    # each member's curve is named after it; the assembled ensemble's validation comes last
    assert {"train/loss_m1", "train/grad_norm_m1", "val_accuracy_m1", "train/lr"} <= {k for m in log for k in m}
    assert "val_accuracy" in log[-1] and not any("train/grad_norm" in m for m in log)
    folders = [save_member(train_member(full, TRAIN, i, train, val), tmp_path / f"m{i}") for i in (1, 0)]
    apart = assemble(full, TRAIN, load_members(folders[::-1]), val, tmp_path / "apart")
    assert json.dumps(apart.metrics) == json.dumps(whole.metrics)
    assert_same_ensemble(tmp_path / "whole", tmp_path / "apart")


def test_a_member_does_not_depend_on_the_other_members(full, split, tmp_path):
    train, _ = split
    alone = train_member(full, TRAIN, 1, train)
    among_three = train_member(derive(full, k=3), TRAIN, 1, train)
    a, b = alone.model.state_dict(), among_three.model.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert alone.model.standardisation.to_json() == among_three.model.standardisation.to_json()
    assert alone.stage.history == among_three.stage.history
    # bootstrap weights are drawn for k members together: the member then sees other pairs
    bootstrap = train_member(derive(full, k=3, diversity="bootstrap"), TRAIN, 1, train)
    assert bootstrap.stage.history != alone.stage.history


def test_the_steps_assemble_what_one_call_trains(full, split, tmp_path):
    from rmens.data.config import DataConfig
    from rmens.pipeline.data import prepare_data, read_pairs
    from rmens.pipeline.plan import train_reward_model
    from rmens.steps.graph import record
    from rmens.steps.runner import LocalRunner

    def plan(call):
        data = call(prepare_data, "arms", data=DataConfig(source="synthetic", max_pairs=64, val_fraction=0.25))
        return train_reward_model(call, "full-k2-r0", data=data, ensemble=full, train_cfg=TRAIN)

    runner = LocalRunner(Store(tmp_path / "store"))
    output = plan(runner)
    assert runner.computed == ["prepare_data:arms", "train_member:full-k2-r0/m0", "train_member:full-k2-r0/m1",
                               "train_ensemble:full-k2-r0"]
    members = [runner.outputs[f"train_member:full-k2-r0/m{i}"].summary for i in (0, 1)]
    assert output.summary["train_wall_s"] > sum(m["train_wall_s"] for m in members) > 0
    assert output.summary["steps"] == members[0]["steps"] == 2 and "val_accuracy" in output.summary
    data = runner.outputs["prepare_data:arms"]
    train_ensemble(full, TRAIN, read_pairs(data, "train"), read_pairs(data, "val"), tmp_path / "whole")
    assert_same_ensemble(tmp_path / "whole", output.file("ensemble"))
    nodes, _ = record(plan, Store(tmp_path / "store"))
    assert all(node.found is not None for node in nodes.values())  # keyed alike by the graph tools


def test_a_full_arm_is_planned_as_member_calls_that_may_run_at_once(tmp_path):
    from rmens.pipeline.config import PipelineConfig
    from rmens.pipeline.plan import run_pipeline
    from rmens.presets import preset_data
    from rmens.steps.graph import record, waves

    data = apply_overrides(preset_data("smoke"), [f"project_dir={tmp_path}", "arms=[{kind: full, k: 2}]",
                                                  "ppo_arms=[full-k2]"])
    nodes, _ = record(run_pipeline, Store(tmp_path), PipelineConfig.model_validate(data))
    members = ["train_member:full-k2-r0/m0", "train_member:full-k2-r0/m1"]
    assert [nodes[name].inputs["member"] for name in members] == [0, 1]
    assembly = nodes["train_ensemble:full-k2-r0"]
    assert assembly.after == ("prepare_data:arms", *members)
    assert [m.key for m in assembly.inputs["members"]] == [nodes[name].key for name in members]
    assert "members" not in nodes["train_ensemble:gold"].inputs  # a linear gold trains in one call
    wave = next(w for w in waves(nodes) if nodes[members[0]] in w)
    assert nodes[members[1]] in wave and assembly not in wave
    # what reads the ensemble reads the assembly
    assert nodes["score:full-k2-r0"].inputs["scorer"].key == assembly.key
    assert nodes["train_member:full-k2-r0/m1"].tags == {"arm": "full-k2", "kind": "full", "k": "2", "run": "0",
                                                        "member": "1"}


def test_the_experiment_plans_a_full_arm_as_member_calls(tmp_path):
    from rmens.experiment.plan import train_reward_model
    from rmens.steps import Output
    from rmens.steps.graph import record, waves

    pairs = Output(step="pairs", key="p" * 64, path=str(tmp_path / "pairs"))
    ensemble = EnsembleConfig(kind="full", k=3, backbone=TINY, max_length=64)

    def plan(call):
        return train_reward_model(call, "full-k3-r0", tags={"arm": "full-k3"}, pairs=pairs, pairs_file="proxy_pairs",
                                  ensemble=ensemble, train=TRAIN)

    nodes, returned = record(plan, Store(tmp_path))
    assert list(nodes) == [f"member:full-k3-r0/m{i}" for i in range(3)] + ["train:full-k3-r0"]
    assert nodes["train:full-k3-r0"].after == tuple(list(nodes)[:3]) and returned.step == "train"
    assert [len(w) for w in waves(nodes)] == [3, 1]


def _untrained(cfg: EnsembleConfig, member: int, train: TrainConfig = TRAIN) -> TrainedMember:
    model = build_member(cfg, member)
    model.standardisation = MemberStandardisation(torch.zeros(1, dtype=torch.float64),
                                                  torch.ones(1, dtype=torch.float64), 16)
    return TrainedMember(member, cfg, train, model, StageResult(steps=0, wall_time=0.0))


def test_members_that_do_not_make_the_ensemble_are_refused_naming_the_member(tiny_path, split, tmp_path):
    cfg = EnsembleConfig(kind="full", k=2, backbone=TINY, max_length=64)
    with pytest.raises(ValueError, match=r"member 2 of a full ensemble of k=2: its members are 0 to 1"):
        train_member(cfg, TRAIN, 2, split[0])
    with pytest.raises(ValueError, match="for kind 'full' only, not 'linear'"):
        train_member(derive(cfg, kind="linear"), TRAIN, 0, split[0])
    m0, m1 = _untrained(cfg, 0), _untrained(cfg, 1)
    with pytest.raises(ValueError, match="k=2 is assembled from 2 members, got 1"):
        assemble(cfg, TRAIN, [m0])
    with pytest.raises(ValueError, match="member 1 was given as member 0: give the members in order"):
        assemble(cfg, TRAIN, [m1, m0])
    with pytest.raises(ValueError, match=r"member 1 was trained for another ensemble .* differs in backbone\)"):
        assemble(cfg, TRAIN, [m0, _untrained(derive(cfg, backbone=tiny_path), 1)])
    with pytest.raises(ValueError, match=r"member 1 was trained with other training settings .* differs in lr\)"):
        assemble(cfg, TRAIN, [m0, _untrained(cfg, 1, derive(TRAIN, lr=1e-3))])
    # read back from folders, a member is named by its folder
    folders = [save_member(m, tmp_path / f"m{m.index}") for m in (m0, _untrained(derive(cfg, seed=9), 1))]
    with pytest.raises(ValueError, match=rf"member 1 \({tmp_path / 'm1'}\) was trained for another ensemble .* "
                                         r"differs in seed\)"):
        assemble(cfg, TRAIN, load_members(folders))
    with pytest.raises(FileNotFoundError, match="not a trained member of a full ensemble"):
        load_members([tmp_path])
    with pytest.raises(ValueError, match=r"calibrated on \[16, 20\] responses cannot be joined"):
        MemberStandardisation.concat([m0.model.standardisation, MemberStandardisation(
            torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), 20)])
