"""The reference experiment: its configuration, its split (evaluation instructions are never trained on),
and the tiny size end to end through the plain runner, on hand-made AlpacaEval-format folders."""

import json

import pytest
from ae_data import instructions, synthetic_annotations
from conftest import real_data_dir, requires_real_data
from pydantic import ValidationError

from rmens.experiment.config import ArmSpec, ExperimentConfig, PPOArm, load_experiment, size_preset
from rmens.experiment.runner import run_experiment

ARMS = ["single-s0", "single-s1", "linear-k5", "lora-k5", "lora-k5-all", "full-k3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae")
    train = synthetic_annotations(root / "train", instructions(48))
    # held-back annotations: new instructions, and one that is also in the training folder
    held = synthetic_annotations(root / "held", instructions(9, start=100) + instructions(1), split="test", seed=1)
    return train, held


def tiny(folders, *overrides, held_out=True):
    train, held = folders
    return load_experiment("tiny", list(overrides), eval_data=held if held_out else None, data_dir=train)


def test_arms_have_labels_and_derived_configs_are_validated():
    assert [ArmSpec(kind="lora", k=5, top_layers=t).label for t in (None, 1.0, 0.5)] == \
        ["lora-k5", "lora-k5-all", "lora-k5-top0.5"]
    with pytest.raises(ValidationError, match="a single arm has k=1"):
        ArmSpec(kind="single", k=2)
    with pytest.raises(ValidationError, match="top_layers applies to lora arms only"):
        ArmSpec(kind="linear", k=3, top_layers=0.5)
    base = size_preset("tiny")
    # the shared ensemble says freeze_backbone, which a LoRA arm's derived config must refuse at once
    with pytest.raises(ValidationError, match="freeze_backbone applies to kind='linear' only"):
        ExperimentConfig.model_validate({**base, "ensemble": {**base["ensemble"], "freeze_backbone": True}})
    with pytest.raises(ValidationError, match="ppo_arms entry 'linear-k9/mean': no arm 'linear-k9'"):
        ExperimentConfig.model_validate({**base, "ppo_arms": [{"arm": "linear-k9"}]})
    with pytest.raises(ValidationError, match="rule 'min' is not among the rules of arm 'single-s0'"):
        ExperimentConfig.model_validate({**base, "ppo_arms": [{"arm": "single-s0", "rule": {"rule": "min"}}]})
    with pytest.raises(ValidationError, match="gold judge must see at least the proxies' context"):
        load_experiment("tiny", ["gold.ensemble.max_length=32"])
    with pytest.raises(ValidationError, match="arms 'lora-k5' and 'lora-k5-top0.25' would train the same model"):
        ExperimentConfig.model_validate({**base, "arms": [{"kind": "lora", "k": 5},
                                                          {"kind": "lora", "k": 5, "top_layers": 0.25}]})
    with pytest.raises(ValidationError, match="top_layers above 1 must be a whole layer count"):
        ExperimentConfig.model_validate({**base, "arms": [{"kind": "lora", "k": 5, "top_layers": 2.5}]})
    with pytest.raises(ValueError, match="unknown experiment size 'huge'"):
        load_experiment("huge")
    cfg = load_experiment("tiny")
    ppo = cfg.ppo_config(PPOArm(arm="linear-k5", rule={"rule": "uwo", "lam": 0.5}))
    assert ppo.aggregation.name == "uwo0.5" and ppo.policy == cfg.policy and ppo.steps == cfg.ppo.steps


@pytest.mark.parametrize("size", ["tiny", "cpu", "gpu-check", "gpu"])
def test_every_size_has_every_arm_and_rule(size):
    cfg = load_experiment(size)
    assert {arm.label for arm in cfg.arms} >= set(ARMS)
    assert [rule.name for rule in cfg.rules] == ["mean", "min", "lcb1", "uwo0.5"]
    assert cfg.gold.ensemble.max_length > cfg.ensemble.max_length and cfg.ppo_arms


@pytest.mark.parametrize("held_out", [True, False])
def test_evaluation_instructions_are_never_trained_on(folders, tmp_path, held_out):
    from rmens.data.loaders import load_jsonl_pairs
    from rmens.experiment.data import build_pools, read_prompts, read_split_pools, source_fingerprints, split_pairs

    cfg = tiny(folders, held_out=held_out)
    sources = source_fingerprints(cfg.data)
    summary = split_pairs(cfg.data, cfg.split, tmp_path / "pairs", sources)
    build_pools(cfg.data, cfg.pools, tmp_path / "pools", sources["evaluation"])
    pools = {p.instruction for judge in ("ae1", "ae2") for p in read_split_pools(tmp_path / "pools", judge)}
    gold = {p.prompt for p in load_jsonl_pairs(tmp_path / "pairs" / "gold_pairs.jsonl")}
    proxy = {p.prompt for p in load_jsonl_pairs(tmp_path / "pairs" / "proxy_pairs.jsonl")}
    ppo_prompts = set(read_prompts(tmp_path / "pairs", "ppo_prompts.json"))
    split = json.loads((tmp_path / "pairs" / "split.json").read_text())
    assert pools and gold and proxy and not gold & proxy and ppo_prompts <= proxy
    assert not pools & (gold | proxy | ppo_prompts)
    assert set(read_prompts(tmp_path / "pools", "eval_prompts.json")) <= pools
    assert summary["evaluation_instructions_in_training"] == 0 and split["sources"] == sources
    if held_out:  # every instruction of the held-back folder left the training data, the shared one too
        assert pools <= set(instructions(9, start=100) + instructions(1))
        assert split["filtered"]["pairs_of_evaluation_instructions_removed"] == 2 * 10
        assert instructions(1)[0] not in gold | proxy
    else:
        assert pools <= set(instructions(48)) and split["evaluation_instructions"] < 48


def test_new_input_files_change_the_data_keys(folders, tmp_path):
    import shutil

    from rmens.experiment.data import source_fingerprints

    train, held = folders
    copy = shutil.copytree(held, tmp_path / "held")
    cfg = load_experiment("tiny", eval_data=copy, data_dir=train)
    before = source_fingerprints(cfg.data)
    synthetic_annotations(copy, instructions(3, start=200), split="test", seed=5)
    after = source_fingerprints(cfg.data)
    assert before["training"] == after["training"] and before["evaluation"] != after["evaluation"]


@pytest.fixture(scope="module")
def tiny_runs(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    first = run_experiment(tiny(folders), out)
    second = run_experiment(tiny(folders), out)
    third = run_experiment(tiny(folders, "ppo.lr=0.005"), out)
    fourth = run_experiment(tiny(folders, "ppo.lr=0.005", "pools.eval_prompts=3"), out)
    return out, first, second, third, fourth


def test_tiny_experiment_writes_logged_bon_in_the_promised_shape(tiny_runs):
    out, first, *_ = tiny_runs
    logged = json.loads((out / "logged_bon.json").read_text())
    assert set(logged["judges"]) == {"ae1", "ae2"}
    for entry in logged["judges"].values():
        assert set(entry["baselines"]) == {"random", "longest", "shortest", "best"}
        expected = {f"{arm}/{rule}" for arm in ARMS for rule in ("mean", "min", "lcb1", "uwo0.5")
                    if not arm.startswith("single") or rule == "mean"}
        assert set(entry["arms"]) == expected and set(entry["gold"]) == {"gold/mean"}
        for rows in [*entry["baselines"].values(), *entry["arms"].values()]:
            assert [r["n"] for r in rows] == [1, 2, 4, 8]
            assert all({"n", "win_rate", "se", "mean_length"} <= set(r) and 0 <= r["win_rate"] <= 1 for r in rows)
        first_rows = [rows[0]["win_rate"] for rows in [*entry["baselines"].values(), *entry["arms"].values()]]
        assert max(first_rows) - min(first_rows) < 1e-12  # n = 1 is a random pick whatever the reward
        best = [r["win_rate"] for r in entry["baselines"]["best"]]
        assert best == sorted(best)  # picking by the judge's own verdict only gains with n, and is the ceiling
        assert all(rows[-1]["win_rate"] <= best[-1] + 1e-12 for rows in entry["arms"].values())
        assert entry["baselines"]["longest"][-1]["mean_length"] > entry["baselines"]["shortest"][-1]["mean_length"]
    for name in ("report.md", "results.json", "logged_bon.csv", "logged_bon_ae1.png", "rm_eval.json",
                 "ppo_curves/curves.png"):
        assert (out / name).is_file(), name
    assert {"pairs:pairs", "pools:pools"} <= set(first["computed"]) and not first["reused"]


def test_report_holds_the_tables_and_a_verdict_for_each_claim(tiny_runs):
    out, *_ = tiny_runs
    report = (out / "report.md").read_text()
    for heading in ("The paper's table", "What agrees with the papers", "cost and held-out agreement",
                    "Best-of-n over logged outputs", "PPO judged by the gold reward model"):
        assert heading in report
    results = json.loads((out / "results.json").read_text())
    sources = {c["source"] for c in results["claims"]}
    assert {"Zhang et al. 2024", "Coste et al. 2023"} <= sources
    verdicts = ("agrees", "no significant difference", "better here", "disagrees", "not reproduced")
    assert all(c["verdict"].startswith(verdicts) and c["se"] >= 0 for c in results["claims"])
    for judge in ("ae1", "ae2"):
        rm = results["reward_models"][judge]
        assert set(rm) == {"gold", *ARMS}
        assert all({"accuracy", "accuracy_longer_lost", "length_rule_accuracy", "ece"} <= set(m) for m in rm.values())
    for label, ppo in results["ppo"].items():
        assert [p["step"] for p in ppo["points"]] == [0, 1, 2], label
        assert all({"kl", "gold", "proxy", "response_chars", "gold_win_rate_ae1"} <= set(p) for p in ppo["points"])
    assert all(t["train_wall_s"] > 0 and t["train_peak_mib"] > 0 for t in results["train"].values())


def test_a_second_run_reuses_every_step_and_a_ppo_change_reruns_only_ppo(tiny_runs):
    _, first, second, third, fourth = tiny_runs
    assert second["computed"] == [] and second["reused"] == first["computed"]
    assert set(third["computed"]) == {"ppo:single-s0/mean", "ppo_eval:single-s0/mean", "ppo:linear-k5/mean",
                                      "ppo_eval:linear-k5/mean", "ppo:linear-k5/uwo0.5", "ppo_eval:linear-k5/uwo0.5",
                                      "report:report"}
    # other evaluation pools rescore every model but retrain none
    assert "pools:pools" in fourth["computed"] and not any(step.startswith("train:") for step in fourth["computed"])


def test_missing_folders_fail_in_one_line_before_any_work(folders, tmp_path, monkeypatch):
    train, _ = folders
    with pytest.raises(FileNotFoundError, match="has no ae1_gpt4_pairs.*for judge set ae1"):
        run_experiment(load_experiment("tiny", eval_data=tmp_path, data_dir=train), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="lacks ae1_gpt4_pairs.train.jsonl.gz"):
        run_experiment(load_experiment("tiny", data_dir=tmp_path), tmp_path / "out")
    monkeypatch.delenv("RMENS_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="set RMENS_DATA_DIR"):
        run_experiment(load_experiment("tiny"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_an_experiment_is_refused(folders, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an rmens experiment folder"):
        run_experiment(tiny(folders), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@requires_real_data
def test_tiny_size_runs_on_the_real_verdicts(tmp_path):
    run = run_experiment(load_experiment("tiny", ["ppo_arms=[]"]), tmp_path)
    logged = json.loads((tmp_path / "logged_bon.json").read_text())
    assert run["wall_s"] < 120
    ae1 = logged["judges"]["ae1"]
    assert ae1["n_instructions"] == 6 and str(real_data_dir().resolve()) in (tmp_path / "report.md").read_text()
    longest = [r["mean_length"] for r in ae1["baselines"]["longest"]]
    assert longest == sorted(longest)


def test_proxy_labels_follow_the_gold_model_or_get_noise(tiny_tokenizer, tmp_path):
    from conftest import TINY

    from rmens.config import EnsembleConfig
    from rmens.data.loaders import load_jsonl_pairs, synthetic_pairs
    from rmens.experiment.train import proxy_labels_step
    from rmens.io import write_jsonl
    from rmens.models.ensemble import build_ensemble
    from rmens.reward import EnsembleReward

    build_ensemble(EnsembleConfig(kind="linear", k=1, backbone=TINY, max_length=64, seed=3)).save(
        tmp_path / "gold" / "ensemble", tiny_tokenizer)
    pairs = synthetic_pairs(40, seed=2)
    write_jsonl(tmp_path / "data" / "proxy_pairs.jsonl", (p.to_dict() for p in pairs))
    gold = EnsembleReward.from_folder(tmp_path / "gold" / "ensemble")
    prompts = [p.prompt for p in pairs]

    def margins(rows):
        return gold(prompts, [p.chosen for p in rows]).scores - gold(prompts, [p.rejected for p in rows]).scores

    summary = proxy_labels_step(tmp_path / "relabelled", pairs=tmp_path / "data", gold=tmp_path / "gold",
                                label_noise=0.0, seed=0)
    relabelled = load_jsonl_pairs(tmp_path / "relabelled" / "proxy_pairs.jsonl")
    assert summary["relabelled_by_gold"] == int((margins(pairs) < 0).sum()) > 0
    assert bool((margins(relabelled) >= 0).all()) and all(p.weight == 1.0 for p in relabelled)
    summary = proxy_labels_step(tmp_path / "noisy", pairs=tmp_path / "data", gold=None, label_noise=0.25, seed=0)
    noisy = load_jsonl_pairs(tmp_path / "noisy" / "proxy_pairs.jsonl")
    assert summary["flipped"] == 10 == sum(a.chosen != b.chosen for a, b in zip(pairs, noisy))


def test_the_plain_script_runs_without_the_orchestration_stack(folders, tmp_path):
    """What a GPU machine with torch, transformers, peft and accelerate but no Prefect, MLflow, alpaca_eval,
    pandas, datasets or scipy runs: bench/reference_experiment.py, with those imports made impossible."""
    import subprocess
    import sys
    from pathlib import Path

    train, held = folders
    root = Path(__file__).resolve().parents[1]
    script = ("import runpy, sys\n"
              "for name in ('prefect', 'mlflow', 'alpaca_eval', 'pandas', 'datasets', 'scipy', 'flows', 'tasks'):\n"
              "    sys.modules[name] = None  # import fails, as where the package is not installed\n"
              "sys.path.insert(0, 'bench')\n"
              "sys.argv = ['reference_experiment.py'] + sys.argv[1:]\n"
              "runpy.run_path('bench/reference_experiment.py', run_name='__main__')\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", script, "--size", "tiny", "--data-dir", str(train), "--eval-data",
                           str(held), "--out", str(out), "--set", "ppo_arms=[{arm: linear-k5}]", "--bench-out",
                           str(tmp_path / "bench")], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "logged_bon.json").read_text())["judges"]["ae2"]["arms"]
    assert "reference experiment, size tiny" in (tmp_path / "bench" / "reference_experiment_tiny.txt").read_text()
