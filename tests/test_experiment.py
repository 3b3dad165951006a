"""The reference experiment: its configuration, its split (evaluation instructions and held-out systems are
never trained on), the untrained twins, and the tiny size end to end through the plain runner, on hand-made
AlpacaEval-format folders and a hand-made MT-Bench grades file."""

import json
import math

import pytest
import torch
from ae_data import instructions, synthetic_annotations, synthetic_grades
from conftest import real_data_dir, requires_real_data
from pydantic import ValidationError

from rmens.arms import Arm, PPOArm
from rmens.data.schema import DataError
from rmens.evaluation import stats
from rmens.experiment.config import ExperimentConfig, load_experiment
from rmens.experiment.runner import run_experiment
from rmens.presets import preset_data

ARMS = ["single", "linear-k5", "lora-k5", "lora-k5-all", "full-k3"]
RULES = ("mean", "min", "lcb1", "uwo0.5")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae")
    train = synthetic_annotations(root / "train", instructions(48))
    # held-back annotations: new instructions, and one that is also in the training folder
    held = synthetic_annotations(root / "held", instructions(9, start=100) + instructions(1), split="test", seed=1)
    synthetic_grades(root / "grades.jsonl.gz")
    return train, held


def tiny(folders, *overrides, held_out=True):
    train, held = folders
    return load_experiment("tiny", list(overrides), eval_data=held if held_out else None, data_dir=train,
                           mt_bench_grades=train.parent / "grades.jsonl.gz")


def test_arms_have_labels_and_derived_configs_are_validated():
    assert [Arm(kind="lora", k=5, top_layers=t).label for t in (None, 1.0, 0.5)] == \
        ["lora-k5", "lora-k5-all", "lora-k5-top0.5"]
    assert Arm(kind="single").label == "single"
    with pytest.raises(ValidationError, match="a single arm has k=1"):
        Arm(kind="single", k=2)
    with pytest.raises(ValidationError, match="top_layers applies to lora arms only"):
        Arm(kind="linear", k=3, top_layers=0.5)
    base = preset_data("tiny", "experiment")
    # the shared ensemble says freeze_backbone, which a LoRA arm's derived config must refuse at once
    with pytest.raises(ValidationError, match="freeze_backbone applies to kind='linear' only"):
        ExperimentConfig.model_validate({**base, "ensemble": {**base["ensemble"], "freeze_backbone": True}})
    with pytest.raises(ValidationError, match="ppo_arms entry 'linear-k9/mean': no arm 'linear-k9'"):
        ExperimentConfig.model_validate({**base, "ppo_arms": [{"arm": "linear-k9"}]})
    with pytest.raises(ValidationError, match="ppo_arms entry 'single/min': a single reward model has only the mean"):
        ExperimentConfig.model_validate({**base, "ppo_arms": [{"arm": "single", "rule": {"rule": "min"}}]})
    with pytest.raises(ValidationError, match="primary.a: no series 'linear-k9/mean'"):
        ExperimentConfig.model_validate({**base, "primary": {"a": "linear-k9/mean", "b": "single/mean"}})
    with pytest.raises(ValidationError, match="ppo_runs=3 but arm 'single' has only 2 training runs"):
        ExperimentConfig.model_validate({**base, "ppo_runs": 3})
    with pytest.raises(ValidationError, match="leaves the gold judge no instructions"):
        load_experiment("tiny", ["split.ppo_fraction=0.7"])
    with pytest.raises(ValidationError, match="ppo_generation must sample without truncation"):
        load_experiment("tiny", ["ppo_generation.top_p=0.9"])
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
    assert cfg.ppo_arms == [PPOArm(arm="single"), PPOArm(arm="linear-k5"), PPOArm.model_validate("linear-k5/uwo0.5")]


def test_every_run_has_its_own_seed_for_members_and_data_order():
    cfg = load_experiment("tiny")
    seeds = [(arm.ensemble_config(cfg.ensemble, r).seed, arm.train_config(cfg.train, r).seed)
             for arm in cfg.arms for r in range(cfg.runs_of(arm))]
    assert len(set(seeds)) == len(seeds) == 2 * len(cfg.arms)  # each run its own (streams split them further)
    single = cfg.arm("single")
    assert single.ensemble_config(cfg.ensemble, 1).seed == single.ensemble_config(cfg.ensemble, 1).seed  # stable
    assert [single.run_label(r) for r in range(2)] == ["single-r0", "single-r1"]
    # the seeds of before the pipeline and the experiment shared one Arm: their runs stay comparable
    assert single.ensemble_config(cfg.ensemble, 0).seed == single.train_config(cfg.train, 0).seed == 2089604669
    assert cfg.arm("lora-k5-all").ensemble_config(cfg.ensemble, 1).seed == 2023934007
    assert [cfg.ppo_config(p, 0).seed for p in cfg.ppo_arms] == [2621132152, 2460222416, 3582691837]


@pytest.mark.parametrize("size", ["tiny", "cpu", "gpu-check", "gpu"])
def test_every_size_has_every_arm_and_rule(size):
    cfg = load_experiment(size)
    assert {arm.label for arm in cfg.arms} >= set(ARMS) - ({"lora-k5-all"} if size == "cpu" else set())
    assert [rule.name for rule in cfg.rules] == list(RULES)
    assert cfg.gold.ensemble.max_length > cfg.ensemble.max_length and cfg.ppo_arms
    assert all(cfg.runs_of(arm) >= (3 if size.startswith("gpu") else 2) for arm in cfg.arms)
    assert cfg.ppo.generation.top_p == cfg.ppo_generation.top_p == 1.0


@pytest.mark.parametrize("held_out", [True, False])
def test_evaluation_instructions_and_held_out_systems_are_never_trained_on(folders, tmp_path, held_out):
    from rmens.data.loaders import load_jsonl_pairs
    from rmens.experiment.data import (
        build_pools,
        held_out_generators,
        read_prompts,
        read_split_pools,
        source_fingerprints,
        split_pairs,
    )

    cfg = tiny(folders, held_out=held_out)
    sources = source_fingerprints(cfg.data, cfg.mt_bench)
    summary = split_pairs(cfg.data, cfg.split, tmp_path / "pairs", sources)
    build_pools(cfg.data, cfg.pools, cfg.mt_bench, tmp_path / "pools", sources)
    judge_pools = [p for judge in ("ae1", "ae2") for p in read_split_pools(tmp_path / "pools", judge)]
    pools = {p.instruction for p in judge_pools}
    gold_pairs = load_jsonl_pairs(tmp_path / "pairs" / "gold_pairs.jsonl")
    proxy_pairs = load_jsonl_pairs(tmp_path / "pairs" / "proxy_pairs.jsonl")
    gold, proxy = {p.prompt for p in gold_pairs}, {p.prompt for p in proxy_pairs}
    ppo_prompts = set(read_prompts(tmp_path / "pairs" / "ppo_prompts.json"))
    split = json.loads((tmp_path / "pairs" / "split.json").read_text())
    # three disjoint training shares: PPO's prompts carry no label any reward model saw
    assert pools and gold and proxy and ppo_prompts and not gold & proxy and not ppo_prompts & (gold | proxy)
    assert not pools & (gold | proxy | ppo_prompts)
    assert set(read_prompts(tmp_path / "pools" / "eval_prompts.json")) <= pools
    assert summary["evaluation_instructions_in_training"] == 0 and split["sources"] == sources
    # held-out systems: 8 of the 20 synthetic ones, the same in both judge sets; no output of theirs trains,
    # and the pools hold nothing else
    systems = held_out_generators(cfg.data)
    held = set(systems["ae1"])
    assert len(held) == round(0.4 * 20) and set(systems["ae2"]) == held
    assert not held & {p.source["generator_2"] for p in gold_pairs + proxy_pairs}
    assert {g for p in judge_pools for g in p.generators} <= held and split["held_out_systems"] == len(held)
    assert json.loads((tmp_path / "pools" / "held_out_generators.json").read_text()) == systems
    prior = json.loads((tmp_path / "pools" / "system_prior_ae1.json").read_text())
    assert held <= set(prior)  # their win rates on training instructions: the system_prior baseline
    if held_out:  # every instruction of the held-back folder left the training data, the shared one too
        assert pools <= set(instructions(9, start=100) + instructions(1))
        assert split["filtered"]["pairs_of_evaluation_instructions_removed"] == 2 * 20
        assert instructions(1)[0] not in gold | proxy
    else:
        assert pools <= set(instructions(48)) and split["evaluation_instructions"] < 48


def test_held_out_systems_follow_a_fixed_rule(tmp_path):
    """A share of system families, by a hash of the family name; a length-styled variant goes with its system,
    and reference systems always train."""
    from ae_data import record, write_annotations

    from rmens.experiment.config import DataSource
    from rmens.experiment.data import held_out_generators, system_family

    names = [f"sys{i}" for i in range(10)] + ["sys3_concise", "sys3_verbose", "example", "gpt4_0314", "vicuna-7b",
                                               "vicuna-13b-v1.5", "llama-2-7b-chat-hf", "llama-2-70b-chat-hf"]
    for prefix, ref in (("ae1_gpt4_pairs", "text_davinci_003"), ("ae2_gpt4turbo_pairs", "gpt4_1106_preview")):
        rows = [record("q", "r", f"answer of {g}", g, 2, ref) for g in names + ["text_davinci_003"]]
        write_annotations(tmp_path / f"{prefix}.train.jsonl.gz", rows)
    source = DataSource(data_dir=str(tmp_path), generator_fraction=0.5)
    held = held_out_generators(source)
    families = {system_family(g) for g in held["ae1"]}
    assert held["ae1"] == held["ae2"] and len(held["ae1"]) >= 8  # half of the 16 candidate systems, or more
    for family in families:  # whole families: no sibling of a held-out system trains
        assert {g for g in names if system_family(g) == family} <= set(held["ae1"])
    assert not {"example", "text_davinci_003", "gpt4_1106_preview", "gpt4_0314"} & set(held["ae1"])  # references'
    assert system_family("vicuna-7b") == system_family("vicuna-13b-v1.5") == "vicuna"
    assert system_family("sys3_concise") == "sys3" and system_family("gpt4_0314") == "openai"
    other_seed = held_out_generators(DataSource(data_dir=str(tmp_path), generator_fraction=0.5, seed=1))
    assert other_seed["ae1"] != held["ae1"] and held_out_generators(source) == held


def test_new_input_files_change_the_data_keys(folders, tmp_path):
    import shutil

    from rmens.experiment.data import source_fingerprints

    train, held = folders
    copy = shutil.copytree(held, tmp_path / "held")
    cfg = load_experiment("tiny", eval_data=copy, data_dir=train, mt_bench_grades=train.parent / "grades.jsonl.gz")
    before = source_fingerprints(cfg.data, cfg.mt_bench)
    synthetic_annotations(copy, instructions(3, start=200), split="test", seed=5)
    after = source_fingerprints(cfg.data, cfg.mt_bench)
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
    assert set(logged["judges"]) == {"ae1", "ae2"} and set(logged["held_out_generators"]) == {"ae1", "ae2"}
    expected = {f"{arm}/{rule}" for arm in ARMS for rule in RULES if arm != "single" or rule == "mean"}
    for name, entry in [*logged["judges"].items(), ("mt_bench", logged["mt_bench"])]:
        metric = entry["metric"]
        assert set(entry["baselines"]) == {"random", "longest", "shortest", "best", "system_prior"}
        assert set(entry["arms"]) == set(entry["twins"]) == expected and set(entry["gold"]) == {"gold/mean"}
        for rows in [*entry["baselines"].values(), *entry["arms"].values(), *entry["twins"].values()]:
            assert [r["n"] for r in rows] == [1, 2, 4]
            assert all({"n", "kl_bon", metric, "se", "mean_length"} <= set(r) for r in rows)
        assert all(rows[0]["runs"] == 2 and rows[0]["se"] is not None for rows in entry["arms"].values())
        first_rows = [rows[0][metric] for rows in [*entry["baselines"].values(), *entry["arms"].values()]]
        assert max(first_rows) - min(first_rows) < 1e-9  # n = 1 is a random pick whatever the reward
        best = [r[metric] for r in entry["baselines"]["best"]]
        assert best == sorted(best)  # picking by the judge's own verdict only gains with n, and is the ceiling
        assert all(rows[-1][metric] <= best[-1] + 1e-9 for rows in entry["arms"].values())
        assert entry["baselines"]["longest"][-1]["mean_length"] > entry["baselines"]["shortest"][-1]["mean_length"]
        # the exact KL of the pick: 0 for a random pick, and at least log n - (n-1)/n, which assumes independent draws
        assert all(abs(row["kl_bon"]) < 1e-12 for row in entry["baselines"]["random"])
        assert entry["baselines"]["longest"][-1]["kl_bon"] > math.log(4) - 0.75
        pools = [json.loads(line) for line in (out / f"pools_{name}.jsonl").read_text().splitlines()]
        assert len(pools) == entry["n_pools"]
    ae_pools = [json.loads(line) for line in (out / "pools_ae1.jsonl").read_text().splitlines()]
    assert all({"instruction", "generators", "outputs", "wins"} <= set(p) for p in ae_pools)
    assert {g for p in ae_pools for g in p["generators"]} <= set(logged["held_out_generators"]["ae1"])
    for name in ("report.md", "results.json", "logged_bon.csv", "logged_bon_ae1.png", "logged_bon_mt_bench.png",
                 "rm_eval.json", "ppo_curves/curves.png"):
        assert (out / name).is_file(), name
    assert {"pairs:pairs", "pools:pools", "twins:twins"} <= set(first["computed"]) and not first["reused"]


def test_report_holds_the_tables_and_a_corrected_verdict_for_each_claim(tiny_runs):
    out, *_ = tiny_runs
    report = (out / "report.md").read_text()
    headings = ["## The primary comparison", "## Do the pools test Best-of-n", "## The paper's table",
                "## What agrees with the papers", "## Checks of the design", "## Reward models: cost",
                "## Best-of-n over logged outputs", "## The gold judge and PPO"]
    assert [report.index(h) for h in headings] == sorted(report.index(h) for h in headings)  # primary first
    results = json.loads((out / "results.json").read_text())
    primary = results["primary"]
    assert primary["a"] == "lora-k5/mean" and primary["b"] == "single/mean" and primary["p_holm"] == primary["p"]
    assert primary["mdd"] > 0 and primary["plan"]["target"] == 0.03
    claims = [c for c in results["claims"] if not c["verdict"].startswith("withheld")]
    assert {c["source"] for c in claims} >= {"Zhang et al. 2024", "Coste et al. 2023"}
    assert {c["set"] for c in claims} == {"ae1", "ae2"}
    assert {c["set"] for c in results["mt_bench_claims"]} == {"mt_bench"}
    assert not [c for c in claims if c["a"] == "lora-k5/mean" and c["b"] == "single/mean" and c["set"] == "ae2"]
    for c in claims + results["checks"] + results["mt_bench_claims"]:
        assert c["p_holm"] >= c["p"] and c["runs_a"] >= 2 and c["mdd"] > 0
        assert c["verdict"] in (stats.AGREES, stats.DISAGREES, stats.NOT_REPRODUCED, stats.NO_DIFFERENCE,
                                stats.DIFFERS_BETTER, stats.DIFFERS_WORSE)
    p = sorted(c["p"] for c in claims)
    assert min(c["p_holm"] for c in claims) == pytest.approx(min(1.0, p[0] * len(p)))  # Holm's first step
    assert {r["set"] for r in results["recognition"]} == {"ae1", "ae2", "mt_bench"}
    for name in ("ae1", "ae2", "mt_bench"):
        rm = results["reward_models"][name]
        runs = {f"{arm}-r{r}" for arm in ARMS for r in range(2)}
        assert set(rm) == {"gold"} | runs | {f"twin:{label}" for label in runs}
        assert all({"accuracy", "accuracy_longer_lost", "length_rule_accuracy"} <= set(m) for m in rm.values())
    assert len(results["ppo"]) == 3 and all([p["step"] for p in ppo["points"]] == [0, 1, 2]
                                            for ppo in results["ppo"].values())
    ppo = [c for c in results["claims"] if c["setting"].startswith("PPO")]
    assert ppo and all("matched KL" in c["setting"] for c in ppo)
    assert all(c["verdict"].startswith("withheld") for c in ppo) == (not results["gold_check"]["ok"])
    assert all(t["train_wall_s"] > 0 and t["train_peak_mib"] > 0 for t in results["train"].values())


def test_a_second_run_reuses_every_step_and_a_ppo_change_reruns_only_ppo(tiny_runs):
    _, first, second, third, fourth = tiny_runs
    assert second["computed"] == [] and second["reused"] == first["computed"]
    # a full arm's run: its members, then their assembly
    full = [name for name in first["computed"] if "full-k3-r1" in name and name.startswith(("member:", "train:"))]
    assert full == ["member:full-k3-r1/m0", "member:full-k3-r1/m1", "member:full-k3-r1/m2", "train:full-k3-r1"]
    assert set(third["computed"]) == {"ppo_run:single/mean-r0", "ppo_eval:single/mean-r0", "ppo_run:linear-k5/mean-r0",
                                      "ppo_eval:linear-k5/mean-r0", "ppo_run:linear-k5/uwo0.5-r0",
                                      "ppo_eval:linear-k5/uwo0.5-r0", "experiment_report:report"}
    # other evaluation pools rescore every model but retrain none
    assert "pools:pools" in fourth["computed"] and not any(step.startswith(("train:", "member:"))
                                                           for step in fourth["computed"])


def test_missing_folders_fail_in_one_line_before_any_work(folders, tmp_path, monkeypatch):
    train, _ = folders
    with pytest.raises(FileNotFoundError, match="has no ae1_gpt4_pairs.*for judge set ae1"):
        run_experiment(load_experiment("tiny", eval_data=tmp_path, data_dir=train), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="lacks ae1_gpt4_pairs.train.jsonl.gz"):
        run_experiment(load_experiment("tiny", data_dir=tmp_path), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="MT-Bench grades file not found: .*nowhere.jsonl"):
        run_experiment(load_experiment("tiny", data_dir=train, mt_bench_grades=tmp_path / "nowhere.jsonl"),
                       tmp_path / "out")
    bad = tmp_path / "grades.jsonl"
    bad.write_text('{"question_id": 81, "model": "a", "turn": 1}\n')
    with pytest.raises(DataError, match="grades.jsonl:1: missing field 'score'"):
        run_experiment(load_experiment("tiny", data_dir=train, mt_bench_grades=bad), tmp_path / "out")
    monkeypatch.delenv("RMENS_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="set RMENS_DATA_DIR"):
        run_experiment(load_experiment("tiny"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_reports_a_bad_grades_file_in_one_line_before_any_server_starts(folders, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    train, _ = folders
    bad = tmp_path / "grades.jsonl"
    bad.write_text('{"question_id": 81, "model": "a", "turn": 1}\n')
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "experiment", "--size", "tiny", "--data-dir", str(train),
                           "--mt-bench-grades", str(bad), "--out", str(tmp_path / "out")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"rmens: error: {bad}:1: missing field 'score'"
    assert "temporary local server" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_folder_that_is_not_an_experiment_is_refused(folders, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an rmens experiment folder"):
        run_experiment(tiny(folders), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@requires_real_data
def test_tiny_size_runs_on_the_real_verdicts(tmp_path):
    run_experiment(load_experiment("tiny", ["ppo_arms=[]"]), tmp_path)
    logged = json.loads((tmp_path / "logged_bon.json").read_text())
    ae1 = logged["judges"]["ae1"]
    assert ae1["n_pools"] == 6 and str(real_data_dir().resolve()) in (tmp_path / "report.md").read_text()
    assert logged["mt_bench"]["n_pools"] == 6 and len(logged["held_out_generators"]["ae1"]) > 15
    longest = [r["mean_length"] for r in ae1["baselines"]["longest"]]
    assert longest == sorted(longest)


def test_proxy_labels_follow_the_gold_model_or_get_noise(tiny_tokenizer, tmp_path):
    from conftest import TINY

    from rmens.data.loaders import load_jsonl_pairs, synthetic_pairs
    from rmens.experiment.train import proxy_labels_step
    from rmens.io import write_jsonl
    from rmens.models.config import EnsembleConfig
    from rmens.models.ensemble import build_ensemble
    from rmens.reward import EnsembleReward
    from rmens.steps import Output

    build_ensemble(EnsembleConfig(kind="linear", k=1, backbone=TINY, max_length=64, seed=3)).save(
        tmp_path / "gold" / "ensemble", tiny_tokenizer)
    pairs = synthetic_pairs(40, seed=2)
    write_jsonl(tmp_path / "data" / "proxy_pairs.jsonl", (p.to_dict() for p in pairs))
    gold = EnsembleReward.from_folder(tmp_path / "gold" / "ensemble")
    prompts = [p.prompt for p in pairs]

    def margins(rows):
        return gold(prompts, [p.chosen for p in rows]).scores - gold(prompts, [p.rejected for p in rows]).scores

    data = Output(step="pairs", key="d", path=str(tmp_path / "data"))
    trained = Output(step="train", key="g", path=str(tmp_path / "gold"))
    summary = proxy_labels_step(tmp_path / "relabelled", pairs=data, gold=trained, label_noise=0.0, seed=0)
    relabelled = load_jsonl_pairs(tmp_path / "relabelled" / "proxy_pairs.jsonl")
    assert summary["relabelled_by_gold"] == int((margins(pairs) < 0).sum()) > 0
    assert bool((margins(relabelled) >= 0).all()) and all(p.weight == 1.0 for p in relabelled)
    summary = proxy_labels_step(tmp_path / "noisy", pairs=data, gold=None, label_noise=0.25, seed=0)
    noisy = load_jsonl_pairs(tmp_path / "noisy" / "proxy_pairs.jsonl")
    assert summary["flipped"] == 10 == sum(a.chosen != b.chosen for a, b in zip(pairs, noisy))


def test_the_plain_script_runs_without_the_orchestration_stack(folders, tmp_path):
    """What a GPU machine with torch, transformers, peft and accelerate but no Prefect, MLflow, alpaca_eval,
    pandas or datasets runs: bench/reference_experiment.py, with those imports made impossible (scipy, which the
    verdicts' t-distribution needs, is on such machines: see the project's GPU notes)."""
    import subprocess
    import sys
    from pathlib import Path

    train, held = folders
    root = Path(__file__).resolve().parents[1]
    script = ("import runpy, sys\n"
              "for name in ('prefect', 'mlflow', 'alpaca_eval', 'pandas', 'datasets', 'flows', 'tasks'):\n"
              "    sys.modules[name] = None  # import fails, as where the package is not installed\n"
              "sys.path.insert(0, 'bench')\n"
              "sys.argv = ['reference_experiment.py'] + sys.argv[1:]\n"
              "runpy.run_path('bench/reference_experiment.py', run_name='__main__')\n")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", script, "--size", "tiny", "--data-dir", str(train), "--eval-data",
                           str(held), "--mt-bench-grades", str(train.parent / "grades.jsonl.gz"), "--out", str(out),
                           "--set", "ppo_arms=[{arm: linear-k5}]", "--bench-out",
                           str(tmp_path / "bench")], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "logged_bon.json").read_text())["judges"]["ae2"]["arms"]
    assert "reference experiment, size tiny" in (tmp_path / "bench" / "reference_experiment_tiny.txt").read_text()


def test_untrained_twins_from_one_backbone_pass_equal_each_twin_built_the_long_way(tiny_tokenizer):
    """The twins step scores every run's untrained twin as one linear ensemble of every twin's heads: exact
    only because an untrained full ensemble is k copies of the pretrained backbone and a fresh LoRA adapter
    adds nothing (B = 0). Checked against building each twin as its kind."""
    from conftest import TINY

    from rmens.config import derive
    from rmens.experiment.twins import shared_scorer
    from rmens.models.config import EnsembleConfig
    from rmens.models.ensemble import build_ensemble, to_lora
    from rmens.reward import EnsembleReward

    base = EnsembleConfig(backbone=TINY, max_length=48, lora={"top_layers": 0.5, "rank": 4})
    ensembles = {"linear": derive(base, kind="linear", k=3, seed=11), "lora": derive(base, kind="lora", k=2, seed=5),
                 "full": derive(base, kind="full", k=2, seed=7), "single": derive(base, kind="linear", k=1, seed=9)}
    prompts = ["Say something about fruit.", "Name a colour.", "Why is the sky blue?"]
    responses = ["An apple is a fruit.", "Green.", "Because of Rayleigh scattering of sunlight in the air."]
    reward, rows = shared_scorer(ensembles, batch_size=2)
    together = reward.member_scores(prompts, responses, standardise=False)
    for label, cfg in ensembles.items():
        built = build_ensemble(derive(cfg, kind="linear") if cfg.kind == "lora" else cfg)
        if cfg.kind == "lora":
            built = to_lora(built, cfg)
        alone = EnsembleReward(built, tiny_tokenizer, allow_unstandardised=True).member_scores(
            prompts, responses, standardise=False)
        assert torch.allclose(together[rows[label]], alone, atol=1e-5), label


def test_every_step_is_keyed_by_all_the_code_it_imports():
    """Both pipelines' steps, declared once: a unique name each, and a key over the source of every rmens module
    their module imports, directly or not (a helper two imports away, e.g. the seeding of the data split)."""
    from rmens.experiment.plan import STEPS
    from rmens.pipeline.plan import STEPS as PIPELINE_STEPS

    steps = (*STEPS, *PIPELINE_STEPS)
    assert len({step.name for step in steps}) == len(steps) == 21
    for step in steps:
        assert step.fn.__module__ in step.modules and "rmens.steps.contract" in step.modules
    pairs = next(step for step in STEPS if step.name == "pairs")
    assert {"rmens.seeding", "rmens.data.splits", "rmens.evaluation.pools"} <= set(pairs.modules)
    assert "rmens.ppo.trainer" not in pairs.modules


@requires_real_data
def test_system_families_cover_alpaca_evals_generators():
    """Every AlpacaEval generator's family, as the table says: aliases, siblings, reranked and length-styled
    variants of one line together; the references' line (OpenAI's) never held out."""
    from rmens.experiment.config import DataSource
    from rmens.experiment.data import held_out_generators
    from rmens.experiment.systems import FAMILIES, system_family

    source = DataSource()
    held = held_out_generators(source)
    assert not any(system_family(g) == "openai" for names in held.values() for g in names)
    for name in ("pairrm-tulu-2-70b", "tulu-2-dpo-7b"):
        assert system_family(name) == "tulu-2"
    assert system_family("claude2-alpaca-13b") == "claude2-alpaca-13b" != system_family("claude-2.1_concise")
    seen = {system_family(g) for names in held.values() for g in names}
    assert seen and set(FAMILIES) - {"openai"} >= {f for f in seen if f in FAMILIES}
    for judge, names in held.items():  # each judge set holds out about 40% of its candidate systems
        assert 15 <= len(names) <= 30, (judge, len(names))


def test_the_power_plan_reads_a_finished_run(tiny_runs, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out, *_ = tiny_runs
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "bench/power_plan.py", str(out / "results.json"), "--run-sd", "0.01",
                           "--bench-out", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    plans = json.loads((tmp_path / "power_plan_tiny.json").read_text())["plans"]
    assert len(plans) == 2 and plans[1]["run_sd_a"] == 0.01 and "20 runs x 290 pools" in plans[1]["mdd"]
    assert "runs per arm to detect 0.03" in done.stdout
