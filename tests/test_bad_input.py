"""Bad input fails early, in one line that names the file and line, or the setting: no traceback, no
silent coercion, and no model built or trained before the mistake is reported."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from rmens import cli as lib_cli
from rmens.config import ConfigError, apply_overrides, load_yaml
from rmens.data.loaders import AE_FILES, load_alpaca_eval_pairs, load_jsonl_pairs
from rmens.data.schema import DataError
from rmens.io import read_jsonl
from rmens.pipeline.config import PipelineConfig, load_preset
from rmens.training.config import TrainConfig, TrainJobConfig

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "No."}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def run_lib_cli(capsys, *argv: str) -> str:
    """`python -m rmens.cli ARGV` in-process; asserts the user-error contract and returns the error line."""
    code = lib_cli.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


def _one_line(err: Exception) -> str:
    line = lib_cli.error_line(err)
    assert "\n" not in line
    return line


# 1. a byte that is not UTF-8 in a JSONL file

@pytest.mark.parametrize("gz", [False, True])
def test_non_utf8_byte_in_jsonl_names_file_and_line(tmp_path, gz):
    body = (json.dumps(GOOD) + "\n").encode() * 3 + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    path = tmp_path / ("pairs.jsonl.gz" if gz else "pairs.jsonl")
    path.write_bytes(gzip.compress(body) if gz else body)
    with pytest.raises(DataError, match=rf"{path.name}:4: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_jsonl_pairs(path)


def test_non_utf8_byte_in_an_artifact_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": "\xff"}\n')
    with pytest.raises(ValueError, match=r"samples.jsonl:3: not UTF-8 text"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n{"b": \n')
    with pytest.raises(ValueError, match=r"samples.jsonl:2: invalid JSON"):
        read_jsonl(path)


def test_damaged_gzip_names_the_file(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(GOOD) + "\n").encode() * 50)[:-30])
    with pytest.raises(DataError, match=r"pairs.jsonl.gz:\d+: damaged gzip data"):
        load_jsonl_pairs(path)


def test_cli_reports_a_non_utf8_data_file_in_one_line(tiny_path, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes((json.dumps(GOOD) + "\n").encode() + b'{"prompt": "\xff"}\n')
    line = run_lib_cli(capsys, "train", "--set", "data.source=jsonl", "--set", f"data.path={data}",
                       "--set", f"output_dir={tmp_path / 'out'}")
    assert f"{data}:2: not UTF-8 text" in line
    assert not (tmp_path / "out").exists()


# 2. broken YAML names its file, line and column

def test_broken_yaml_names_file_line_and_column(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  lr: 0.001\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=rf"{path}:4:1: invalid YAML \(while parsing a flow sequence at line 3"):
        load_yaml(path)
    path.write_bytes(b"train:\n  lr: 0.001 # \xe9\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: not UTF-8 text"):
        load_yaml(path)


def test_cli_reports_broken_yaml_in_one_line(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  source: jsonl\n   path: x\n")
    line = run_lib_cli(capsys, "train", "--config", str(path))
    assert f"{path}:3:" in line and "invalid YAML" in line and "<unicode string>" not in line


def test_orchestrating_cli_reports_broken_yaml_without_traceback(tmp_path):
    """`rmens run --config` (a subprocess: the user's view; it fails before Prefect or torch is imported)."""
    path = tmp_path / "pipeline.yaml"
    path.write_text("ppo:\n  lr: [3\n  steps: [4]\n")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _error_lines(proc.stderr) == [f"rmens: error: {path}:3:8: invalid YAML (while parsing a flow sequence "
                                         "at line 2, column 7: expected ',' or ']', but got ':')"]


# 3. overrides that index into a value, non-finite floats, absurd learning rates

@pytest.mark.parametrize("override, names", [
    ("gold.ensemble.k.x=1", "override 'gold.ensemble.k.x=1': gold.ensemble.k is the value 1, not a section"),
    ("rules.0.beta=2", "override 'rules.0.beta=2': rules is a list, not a section"),
    ("arms.ks=[3,5]", "override 'arms.ks=[3,5]': arms is a list, not a section"),
    ("train.lr=[1", "override 'train.lr=[1': the value is not valid YAML"),
])
def test_unusable_override_names_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        load_preset("smoke", [override])
    assert _one_line(err.value).startswith(names)


@pytest.mark.parametrize("override, names", [
    ("ensemble.k.x=1", "ensemble.k: Input should be a valid integer"),
    ("train.epochs=.inf", "train.epochs: Input should be a finite number (got inf)"),
    ("train.warmup_ratio=.nan", "train.warmup_ratio: Input should be a finite number"),
    ("gold.train.epochs=-.inf", "gold.train.epochs: Input should be a finite number"),
    ("train.lr=1e30", "train.lr: Input should be less than or equal to 1 (got '1e30')"),
    ("train.lora_lr=3", "train.lora_lr: Input should be less than or equal to 1"),
    ("ppo.lr=2.5", "ppo.lr: Input should be less than or equal to 1"),
    ("train.weight_decay=5", "train.weight_decay: Input should be less than or equal to 1"),
    ("bon.generation.seed=-1", "bon.generation.seed: Input should be greater than or equal to 0"),
    ("ppo.seed=4294967296", "ppo.seed: Input should be less than 4294967296"),
])
def test_non_finite_and_absurd_values_name_the_setting(override, names):
    with pytest.raises(ValidationError) as err:
        load_preset("smoke", [override])
    assert _one_line(err.value).startswith(f"invalid PipelineConfig settings: {names}")


def test_cli_reports_a_bad_override_in_one_line(tmp_path, capsys):
    common = ["--set", f"output_dir={tmp_path / 'out'}", "--set", "train.max_steps=1", "--set", "data.max_pairs=16"]
    assert run_lib_cli(capsys, "train", "--set", "train.epochs=.inf", *common) == (
        "rmens: error: invalid TrainJobConfig settings: train.epochs: Input should be a finite number (got inf)")
    assert "train.lr: Input should be less than or equal to 1" in run_lib_cli(
        capsys, "train", "--set", "train.lr=1e30", *common)
    assert "ensemble.k: Input should be a valid integer" in run_lib_cli(
        capsys, "train", "--set", "ensemble.k.x=1", *common)
    assert not (tmp_path / "out").exists()


# 4. no booleans passing as numbers; ints for floats and numbers written as text still work

@pytest.mark.parametrize("override, field", [
    ("ensemble.k=true", "ensemble.k"),
    ("train.epochs=false", "train.epochs"),
    ("train.max_steps=true", "train.max_steps"),
    ("ensemble.lora.top_layers=true", "ensemble.lora.top_layers"),
    ("arms=[{kind: linear, k: true}]", "arms.0.k"),
    ("ppo_runs=true", "ppo_runs"),
    ("evaluate.bon_select_n=[true]", "evaluate.bon_select_n"),
])
def test_a_boolean_is_not_a_number(override, field):
    with pytest.raises(ValidationError) as err:
        load_preset("smoke", [override])
    line = _one_line(err.value)
    assert f"{field}: expected a" in line and ("boolean" in line or "True" in line)


@pytest.mark.parametrize("override, message", [
    ("bon.select_n=[4]", "bon: select_n is no longer a setting; set evaluate.bon_select_n"),
    ("gold.held_out_fraction=0.3", "gold: held_out_fraction is no longer a setting; set gold.data.val_fraction"),
    ("judge.kind=alpaca_eval", "judge is no longer a setting; set gold (the reference that scores policies is "
                               "called gold now; the same fields)"),
    ("ppo.judge_every=2", "ppo: judge_every is no longer a setting; set gold_every"),
])
def test_a_retired_setting_names_its_replacement(override, message):
    with pytest.raises(ValidationError) as err:
        load_preset("smoke", [override])
    assert _one_line(err.value).startswith(f"invalid PipelineConfig settings: {message}")


@pytest.mark.parametrize("load, override, message", [
    ("pipeline", "ensemble.k=5", "ensemble.k is ignored here (each arm's k sets it)"),
    ("pipeline", "ensemble.kind=full", "ensemble.kind is ignored here (each arm's kind sets it)"),
    ("pipeline", "ppo.policy=other", "ppo.policy is ignored here (the top-level policy sets it)"),
    ("pipeline", "ppo.aggregation={rule: min}", "ppo.aggregation is ignored here (each ppo_arms entry's rule sets it)"),
    ("pipeline", "bon.n_prompts=3", "n_prompts is no longer a setting; set bon_prompts.max_prompts"),
    ("experiment", "ensemble.k=5", "ensemble.k is ignored here (each arm's k sets it)"),
    ("experiment", "ppo.gold_every=2", "ppo.gold_every is ignored here (the experiment's PPO runs without the gold"),
])
def test_a_setting_another_one_replaces_is_refused_not_ignored(load, override, message):
    from rmens.experiment.config import load_experiment

    with pytest.raises(ValidationError) as err:
        load_preset("smoke", [override]) if load == "pipeline" else load_experiment("tiny", [override])
    assert message in _one_line(err.value)


def test_a_retrain_that_would_register_nothing_is_refused_when_loaded():
    from rmens.pipeline.config import RetrainConfig

    with pytest.raises(ValidationError, match="log_model: retrain compares registered models"):
        RetrainConfig(log_model=False)


def test_numbers_still_load_and_booleans_stay_booleans():
    config = load_preset("smoke", ["train.lr=1", "train.epochs=2", "ensemble.lora.top_layers=2",
                                   "train.lora_lr=1e-4", "gold.train.lr=5e-3", "train.progress=true"])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.epochs == 2.0 and config.ensemble.lora.top_layers == 2
    assert config.train.lora_lr == 1e-4  # PyYAML reads "1e-4" as text; it is still a number
    assert config.train.progress is True
    assert TrainConfig.model_validate({"lr": "2e-5"}).lr == 2e-5
    with pytest.raises(ValidationError, match="boolean"):
        TrainJobConfig().train.epochs = True  # assignment is validated too


def test_every_preset_and_experiment_size_still_loads():
    from rmens.experiment.config import SIZES, load_experiment

    for name in ("smoke", "cpu", "gpu"):
        load_preset(name)
    for size in SIZES:
        load_experiment(size)


def test_cli_rejects_a_boolean_size(tmp_path, capsys):
    assert run_lib_cli(capsys, "train", "--set", "ensemble.k=true", "--set", f"output_dir={tmp_path / 'o'}") == (
        "rmens: error: invalid TrainJobConfig settings: ensemble.k: expected a number, got the boolean true")


# 5. arms and ppo_arms are checked when the config loads, the same way in both pipelines

@pytest.mark.parametrize("entry, message", [
    ("linear-k5", "ppo_arms entry 'linear-k5/mean': no arm 'linear-k5' (arms: single, linear-k3, lora-k3)"),
    ("lora-k3/lcb2", "ppo_arms entry 'lora-k3/lcb2': rule 'lcb2' is not among rules (mean, min, lcb1, uwo0.5)"),
    ("single/lcb1", "ppo_arms entry 'single/lcb1': a single reward model has only the mean rule"),
    ("full-k3", "ppo_arms entry 'full-k3/mean': no arm 'full-k3'"),
    ("single/best", "ppo_arms.1: 'best' names no rule: write mean, min, lcb<beta> or uwo<lam>"),
    ("single/mean", "ppo_arms must differ, got ['single/mean', 'single/mean']"),
])
def test_invalid_ppo_arm_fails_at_load_naming_the_entry(entry, message):
    from rmens.experiment.config import load_experiment

    with pytest.raises(ValidationError) as err:
        load_preset("smoke", [f"ppo_arms=[single, {entry}]"])
    assert message in _one_line(err.value)
    if entry.startswith("single"):  # an arm both have: the experiment refuses the entry in the same words
        with pytest.raises(ValidationError) as err:
            load_experiment("tiny", [f"ppo_arms=[single, {entry}]"])
        assert message in _one_line(err.value)


def test_valid_ppo_arms_resolve_and_no_ppo_skips_the_check():
    from rmens.arms import PPOArm

    config = load_preset("smoke", ["ppo_arms=[single, linear-k3/min, lora-k3/lcb1, {arm: lora-k3, rule: {rule: uwo}}]"])
    assert [(p.arm, p.rule.name) for p in config.ppo_arms] == [("single", "mean"), ("linear-k3", "min"),
                                                              ("lora-k3", "lcb1"), ("lora-k3", "uwo0.5")]
    assert config.ppo_arms[2] == PPOArm(arm="lora-k3", rule={"rule": "lcb", "beta": 1.0})  # short and full alike
    assert [PPOArm.model_validate(f"x/{r.name}").rule for r in config.rules] == config.rules  # names read back
    with pytest.raises(ValidationError, match="no arm 'single'"):
        load_preset("smoke", ["arms=[{kind: linear, k: 3}]"])
    assert load_preset("smoke", ["arms=[{kind: linear, k: 3}]", "ppo=null"]).ppo is None
    with pytest.raises(ValidationError, match="ppo_runs=2 but arm 'single' has only 1 training runs"):
        load_preset("smoke", ["ppo_runs=2"])
    assert load_preset("smoke", ["ppo_runs=2", "runs=2"]).ppo_config(config.ppo_arms[0], 1).seed != \
        load_preset("smoke", ["ppo_runs=2", "runs=2"]).ppo_config(config.ppo_arms[0], 0).seed


def test_the_old_matrix_of_arms_is_refused_in_one_line_naming_what_replaced_it():
    data = {"arms": {"kinds": ["linear"], "ks": [3], "single_seeds": 2, "rules": [{"rule": "mean"}]}}
    with pytest.raises(ValidationError) as err:
        PipelineConfig.model_validate(data)
    assert _one_line(err.value).startswith(
        "invalid PipelineConfig settings: arms is a list of arms now, e.g. [{kind: single, runs: 2}, {kind: linear, "
        "k: 3}] (arms.kinds x arms.ks: one entry each; arms.single_seeds: the single arm's runs; arms.rules: rules)")


# 6. max_length beyond the backbone's context, before a model is built

def test_max_length_beyond_context_is_refused_from_the_config(tiny_path, monkeypatch):
    from rmens.models.config import EnsembleConfig
    from rmens.models.context import check_max_length, check_max_lengths
    from rmens.training import trainer

    with pytest.raises(ValueError, match=r"^ensemble.max_length=1024 exceeds the context of tiny-random-llama: "
                                         r"its max_position_embeddings is 512$"):
        check_max_length("tiny-random-llama", 1024)
    check_max_length("tiny-random-llama", 512)
    config = load_preset("smoke", ["gold.ensemble.max_length=600"])
    with pytest.raises(ValueError, match=r"gold.ensemble.max_length=600 exceeds .* 512"):
        check_max_lengths(config.trained_ensembles())

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before max_length was checked")

    monkeypatch.setattr(trainer, "build_ensemble", no_build)
    monkeypatch.setattr(trainer, "load_tokenizer", no_build)
    from rmens.data.loaders import synthetic_pairs

    with pytest.raises(ValueError, match="max_length=1024 exceeds"):
        trainer.train_ensemble(EnsembleConfig(k=1, max_length=1024), TrainConfig(max_steps=1), synthetic_pairs(8))


def test_cli_refuses_a_long_max_length_before_loading_data(tiny_path, tmp_path, capsys, monkeypatch):
    import rmens.data

    def no_data(*args, **kwargs):
        raise AssertionError("data was prepared before max_length was checked")

    monkeypatch.setattr(rmens.data, "prepare_pairs", no_data)
    line = run_lib_cli(capsys, "train", "--set", "ensemble.max_length=4096", "--set", f"output_dir={tmp_path / 'o'}")
    assert line == ("rmens: error: ensemble.max_length=4096 exceeds the context of tiny-random-llama: "
                    "its max_position_embeddings is 512")


# 7. a malformed AlpacaEval record is an error, not a silent drop

def _write_ae(folder: Path, records: list[dict]) -> Path:
    path = folder / AE_FILES["ae1"]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def _ae(**changes):
    record = {"instruction": "Say hi.", "output_1": "Hello!", "output_2": "Go away.", "generator_1": "ref",
              "generator_2": "model", "preference": 1, "dataset": "d"}
    return {key: value for key, value in {**record, **changes}.items() if value is not ...}


@pytest.mark.parametrize("bad, message", [
    (_ae(output_2=...), ":2: missing field 'output_2'"),
    (_ae(output_1=..., instruction=...), ":2: missing fields 'instruction', 'output_1'"),
    (_ae(preference=...), ":2: missing field 'preference'"),
    (_ae(output_2=None), ":2: field 'output_2' must be a string, got None"),
    (_ae(preference=None), ":2: preference must be a number, got None"),
])
def test_malformed_alpaca_eval_record_names_file_line_and_field(tmp_path, bad, message):
    path = _write_ae(tmp_path, [_ae(), bad, _ae()])
    with pytest.raises(DataError) as err:
        load_alpaca_eval_pairs(tmp_path, "ae1")
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_alpaca_eval_through_the_data_config_and_cli(tiny_path, tmp_path, capsys):
    from rmens.data.config import DataConfig
    from rmens.data.loaders import load_pairs

    path = _write_ae(tmp_path, [_ae(), _ae(output_2=...)])
    with pytest.raises(DataError, match=rf"{path}:2: missing field 'output_2'"):
        load_pairs(DataConfig(source="alpaca_eval", path=str(tmp_path)))
    line = run_lib_cli(capsys, "train", "--set", "data.source=alpaca_eval", "--set", f"data.path={tmp_path}",
                       "--set", f"output_dir={tmp_path / 'out'}")
    assert line == f"rmens: error: {path}:2: missing field 'output_2'"


def test_overrides_still_create_missing_sections():
    assert apply_overrides({}, ["train.lr=0.1"]) == {"train": {"lr": 0.1}}
    assert PipelineConfig.model_validate(apply_overrides({}, ["ppo=null"])).ppo is None


def test_names_mlflow_would_refuse_after_training_are_refused_when_the_config_loads():
    from rmens.pipeline.config import TrainFlowConfig

    with pytest.raises(ValidationError, match="cannot name an MLflow registered model"):
        load_preset("smoke", ["registered_model=team/rewards"])
    for label in ("my/arm", "latest", "v3"):
        with pytest.raises(ValidationError, match="cannot be a registered model alias"):
            TrainFlowConfig(label=label)
    assert TrainFlowConfig(label="linear-k3_v2").label == "linear-k3_v2"


def test_a_key_written_twice_in_a_config_file_is_an_error_naming_the_line(tmp_path):
    from rmens.config import ConfigError, load_yaml

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-5\n  epochs: 2\n  lr: 3.0e-5\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4:3: invalid YAML \(duplicate key 'lr' \(first at line 2\)\)"):
        load_yaml(path)


def test_a_project_dir_that_is_a_file_is_one_error_before_any_work(tmp_path):
    from rmens.preflight import check_before_work

    (tmp_path / "taken").write_text("a user's file")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_before_work(load_preset("smoke", [f"project_dir={tmp_path / 'taken' / 'runs'}"]))
    assert (tmp_path / "taken").read_text() == "a user's file"


def test_a_server_that_does_not_answer_is_named_without_its_credentials(monkeypatch):
    from flows.services import check_servers

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:9/")
    with pytest.raises(ValueError) as err:
        check_servers()
    assert "s3cret" not in str(err.value) and "http://***@127.0.0.1:9/ does not answer" in str(err.value)


@pytest.mark.parametrize("setting, body, names", [
    ("data", json.dumps(GOOD) + "\n" + '{"prompt": "p", "chosen": "a"}\n', ":2: missing field 'rejected'"),
    ("bon_prompts", '{"prompt": "Name a fruit."}\n{"text": "no prompt key"}\n', ":2: needs a non-empty 'prompt'"),
])
def test_rmens_run_reports_a_malformed_record_before_any_server_or_folder(tmp_path, setting, body, names):
    """`rmens run` reads every configured data and prompt file through before a Prefect server starts or the
    project folder is made: a malformed record is one line naming file and line."""
    path = tmp_path / "input.jsonl"
    path.write_text(body)
    source = "jsonl" if setting == "data" else "file"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", "smoke",
                           "--set", f"project_dir={tmp_path / 'p'}", "--set", f"{setting}.source={source}",
                           "--set", f"{setting}.path={path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"rmens: error: {path}{names}"), proc.stderr
    assert not (tmp_path / "p").exists() and "Prefect" not in proc.stderr


def test_a_full_disk_while_saving_is_one_line_naming_the_folder_and_leaves_nothing(tiny_path, tmp_path, capsys,
                                                                                   monkeypatch):
    """safetensors' writer says a full disk only in its message; the save takes back its unfinished folder
    and the command says what the machine refused, in one line (exit 1), after no traceback."""
    import rmens.models.ensemble as ensemble_module

    def full_disk(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ensemble_module, "save_file", full_disk)
    out = tmp_path / "out"
    code = lib_cli.main(["train", "--set", "data.source=synthetic", "--set", "data.max_pairs=16",
                         "--set", "ensemble.k=1", "--set", "train.progress=false", "--set", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert _error_lines(err) == [f"rmens: error: No space left on device: {out} (free some space or choose "
                                 "another folder)"]
    assert not list(tmp_path.iterdir()), "nothing left behind, not even the unfinished folder"


def test_the_machine_refusal_behind_a_failure_is_found_through_its_causes():
    """A run that fails while saving also fails to record that it failed: the last error is the store's
    (SQLite says a full disk only in words), the first names the file that could not be written."""
    from rmens.cli import machine_refusal

    copy = OSError(28, "No space left on device", "/tmp/src.bin", None, "/p/mlartifacts/model.bin")
    try:
        try:
            raise copy
        except OSError as err:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full") from err
    except RuntimeError as final:
        assert machine_refusal(final) is copy
    assert machine_refusal(RuntimeError("attempt to write a readonly database")).errno == 30
    assert machine_refusal(ValueError("a bug")) is None and machine_refusal(OSError(2, "gone", "x")) is None


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "a-file").write_text("a user's file")
    line = run_lib_cli(capsys, "train", "--set", f"output_dir={tmp_path / 'a-file' / 'out'}")
    assert line == f"rmens: error: output folder {tmp_path / 'a-file' / 'out'}: {tmp_path / 'a-file'} is a file, " \
                   "not a folder"
