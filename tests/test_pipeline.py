"""The Prefect pipeline on the smoke preset, under prefect_test_harness, with MLflow in a temp folder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

prefect = pytest.importorskip("prefect")
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from rmens.config import apply_overrides  # noqa: E402
from rmens.pipeline.config import PipelineConfig, RetrainConfig  # noqa: E402
from rmens.presets import preset_data  # noqa: E402


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def smoke(project, *overrides):
    data = apply_overrides(preset_data("smoke"), [f"project_dir={project}", "ppo_arms=[single]",
                                                 "evaluate.mt_bench_questions=1", *overrides])
    return PipelineConfig.model_validate(data)


def runs_of(project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name(f"rmens-{Path(project).name}")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def pipeline_runs(harness, tmp_path_factory):
    from flows.pipeline import pipeline

    project = tmp_path_factory.mktemp("smoke")
    first = pipeline(config=smoke(project))
    second = pipeline(config=smoke(project))
    third = pipeline(config=smoke(project, "ppo.lr=0.005"))
    return project, first, second, third


def test_second_run_is_all_cache_hits(pipeline_runs):
    _, first, second, _ = pipeline_runs
    assert all(state == "Completed" for state in first["states"].values()), first["states"]
    assert set(second["states"]) == set(first["states"])
    assert all(state == "Cached" for state in second["states"].values()), second["states"]
    # the same references come back (compared as JSON: NaN summaries are equal there)
    assert json.dumps(second["summaries"], sort_keys=True) == json.dumps(first["summaries"], sort_keys=True)


def test_changing_ppo_reruns_only_ppo_and_what_follows(pipeline_runs):
    _, first, _, third = pipeline_runs
    rerun = {name for name, state in third["states"].items() if state != "Cached"}
    assert rerun == {"ppo:single/mean-r0", "evaluate:ppo:single/mean-r0", "report:report"}, third["states"]
    assert third["summaries"]["ppo:single/mean-r0"] != first["summaries"]["ppo:single/mean-r0"]


LAST = ["ppo.lr=0.005"]  # the overrides of the fixture's last run


def _cli_args(project, overrides):
    return ["run", *[arg for o in [f"project_dir={project}", "ppo_arms=[single]", "evaluate.mt_bench_questions=1",
                                   *overrides] for arg in ("--set", o)]]


def test_an_unchanged_rerun_reports_the_last_run_without_prefect_or_mlflow(pipeline_runs):
    project, *_, third = pipeline_runs
    _, before = runs_of(project)
    code = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
            "print('heavy:', sorted(m for m in ('prefect', 'mlflow', 'torch') if m in sys.modules)); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, *_cli_args(project, LAST)], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "is up to date" in done.stdout and third["report"] in done.stdout
    assert "heavy: []" in done.stdout  # no Prefect, MLflow or torch import: nothing ran
    assert f"steps: {len(third['states'])} (all up to date" in done.stdout
    assert len(runs_of(project)[1]) == len(before)  # and nothing new recorded


def test_the_plan_checks_against_the_store_by_keys_alone(pipeline_runs):
    """What decides the shortcut: every step's key found finished and intact; a setting, a damaged output
    or another folder sends the run through Prefect, and the same bytes again do not."""
    from rmens.pipeline.plan import run_pipeline
    from rmens.steps import Store
    from rmens.steps.runner import check

    project, *_, third = pipeline_runs
    store, config = Store.of_project(project), smoke(project, *LAST)
    assert check(run_pipeline, store, config).missing == []
    assert check(run_pipeline, store, smoke(project, "ppo.lr=0.004")).missing == [
        "ppo:single/mean-r0", "evaluate:ppo:single/mean-r0", "report:report"]  # only what the setting reaches
    samples = next((project / "artifacts" / "sample").iterdir()) / "samples.jsonl"
    original = samples.read_bytes()
    samples.write_bytes(original + b"\n")  # a damaged output
    assert check(run_pipeline, store, config).missing == ["sample:bon"]
    samples.write_bytes(original)
    assert check(run_pipeline, store, config).missing == []  # same bytes again: re-hashed, intact
    assert len(check(run_pipeline, Store.of_project(project / "elsewhere"), config).missing) == len(third["states"])


@pytest.mark.parametrize("flag", ["--record", "--refresh"])
def test_record_and_refresh_run_the_flow_even_when_up_to_date(pipeline_runs, monkeypatch, capsys, flag):
    import flows.cli
    import flows.pipeline

    project, *_, third = pipeline_runs
    calls = []
    monkeypatch.setattr(flows.cli, "check_servers", lambda: None)
    monkeypatch.setattr(flows.cli, "prepare_environment", lambda project_dir: None)
    monkeypatch.setattr(flows.pipeline, "pipeline", lambda config, refresh: calls.append(refresh) or
                        {**third, "states": {"report:report": "Cached"}})
    assert flows.cli.main([*_cli_args(project, LAST), flag]) == 0
    assert calls == [flag == "--refresh"] and "steps: 1 (1 served from Prefect's cache)" in capsys.readouterr().out


def test_mlflow_parent_child_structure_metrics_and_cache_links(pipeline_runs):
    project, first, second, _ = pipeline_runs
    client, runs = runs_of(project)
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[first["parent_run_id"]]
    assert parent.data.tags["rmens.flow"] == "pipeline:smoke" and "prefect.flow_run_id" in parent.data.tags
    assert parent.data.params["ensemble.backbone"] == "tiny-random-llama"
    # Params: what the run set (and what identifies it), not every default; config.json holds everything.
    assert len(parent.data.params) < 60 and "ensemble.lora.dropout" not in parent.data.params
    assert all(len(r.data.params) < 60 for r in runs), max(len(r.data.params) for r in runs)
    # The parent carries every arm's headline numbers, `<stage>.<metric>/<subject>`, so that flow runs compare.
    assert {"train_ensemble.val_accuracy/linear-k3-r0", "best_of_n.gold_at_N/linear-k3-r0/lcb1",
            "evaluate.win_rate/bon:linear-k3-r0/lcb1:n4", "evaluate.win_rate/ppo:single/mean-r0",
            "ppo.final_kl/single/mean-r0"} <= set(parent.data.metrics), sorted(parent.data.metrics)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags["rmens.stage"] for r in children}
    assert {"prepare_data", "train_ensemble", "sample", "score", "best_of_n", "ppo", "evaluate", "report"} <= stages
    train = next(r for r in children if r.data.tags.get("rmens.arm") == "linear-k3"
                 and r.data.tags["rmens.run"] == "0" and r.data.tags["rmens.stage"] == "train_ensemble")
    assert train.data.params["ensemble.kind"] == "linear" and "val_accuracy" in train.data.metrics
    settings = client.download_artifacts(train.info.run_id, "settings.json")
    settings = json.loads(Path(settings).read_text())  # every setting, defaults included
    assert {"lr", "epochs", "seed"} <= set(settings["train_cfg"]) and "dropout" in settings["ensemble"]["lora"]
    history = client.get_metric_history(train.info.run_id, "train/loss")
    assert len(history) > 1 and len({m.step for m in history}) == len(history)
    ppo_run = next(r for r in children if r.data.tags["rmens.stage"] == "ppo")
    assert len(client.get_metric_history(ppo_run.info.run_id, "kl")) == 2
    datasets = [i.dataset.name for i in next(r for r in children if r.data.tags["rmens.stage"] == "prepare_data"
                                             ).inputs.dataset_inputs]
    assert any(name.endswith("-train") for name in datasets)
    cached = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == second["parent_run_id"]]
    assert cached and all(r.data.tags["rmens.cache_hit"] == "true" for r in cached)
    assert all(r.data.tags["rmens.cached_from_run_id"] in by_id for r in cached)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "summary.csv", "config.json"} <= artifacts


def test_runs_name_themselves_and_carry_what_compare_views_group_by(pipeline_runs):
    project, first, second, _ = pipeline_runs
    client, runs = runs_of(project)
    experiment = client.get_experiment_by_name(f"rmens-{Path(project).name}")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.run_name == f"pipeline:smoke · {parent.data.tags['rmens.config_digest']}"
    assert parent.data.tags["prefect.flow_run_name"].startswith("pipeline:smoke ")  # not a random name
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"train_ensemble:linear-k3-r0", "train_ensemble:gold", "score:lora-k3-r0", "score:gold",
            "evaluate:ppo:single/mean-r0", "evaluate:bon:linear-k3-r0/lcb1:n4", "ppo:single/mean-r0",
            "report:report"} <= set(children)
    lora = children["train_ensemble:lora-k3-r0"]
    assert (lora.data.tags["rmens.kind"], lora.data.tags["rmens.k"], lora.data.params["kind"]) == ("lora", "3", "lora")
    # One metric vocabulary: a LoRA arm's curve has the linear arm's names; no second spelling, no ids.
    linear = children["train_ensemble:linear-k3-r0"]
    assert {"train/loss", "val_accuracy"} <= set(lora.data.metrics) & set(linear.data.metrics)
    phases = {m.value for m in client.get_metric_history(lora.info.run_id, "train/phase")}
    assert phases == {1.0, 2.0}  # heads, then adapters, on one step axis
    every = {name for run in children.values() for name in run.data.metrics}
    assert not any(n.startswith(("stage1", "stage2", "val.")) for n in every) and "model_version" not in every
    pick = children["evaluate:bon:linear-k3-r0/lcb1:n4"].data
    assert [pick.tags[f"rmens.{k}"] for k in ("arm", "run", "rule", "n")] == ["linear-k3", "0", "lcb1", "4"]
    ppo_tags = children["ppo:single/mean-r0"].data.tags
    assert [ppo_tags[f"rmens.{k}"] for k in ("arm", "kind", "run", "rule")] == ["single", "single", "0", "mean"]
    cached = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == second["parent_run_id"]}
    assert "train_ensemble:linear-k3-r0 (cached)" in cached
    table = client.load_table(experiment.experiment_id, "comparison.json", run_ids=[parent.info.run_id])
    # Long format: (stage, label, metric, value), no empty cells however different the stages' numbers.
    assert list(table.columns[:4]) == ["stage", "label", "metric", "value"] and not table.isna().any().any()
    assert {"win_rate", "win_rate_se", "gold_at_N", "proxy_at_N"} <= set(table["metric"])
    figures = {"train_overlay.png", "bon_overlay.png", "ppo_overlay.png"}
    assert figures <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    labels = set(table["label"])
    assert {"eval:ppo:single/mean-r0", "eval:bon:lora-k3-r0/uwo0.5:n4", "linear-k3-r0/lcb1", "lora-k3-r0",
            "gold"} <= labels, labels


def test_registered_model_predicts_members_and_reward(pipeline_runs):
    import mlflow
    import pandas as pd

    project, *_ = pipeline_runs
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    version = mlflow.MlflowClient().get_model_version_by_alias("rmens-smoke", "linear-k3-r0")
    assert version.description.startswith("rmens reward model linear-k3-r0 (arm linear-k3, kind linear, k 3")
    assert "val_accuracy" in version.description
    assert (version.tags["arm"], version.tags["kind"], version.tags["k"]) == ("linear-k3", "linear", "3")
    logged = mlflow.MlflowClient().get_logged_model(version.source.removeprefix("models:/"))
    assert {"val_accuracy", "val_ece"} <= {m.key for m in logged.metrics}, "its evaluation metrics are linked"
    assert logged.name == "reward-model-linear-k3-r0"  # MLflow's Models tab lists them by it
    model = mlflow.pyfunc.load_model("models:/rmens-smoke@linear-k3-r0")
    out = model.predict(pd.DataFrame({"prompt": ["Name a fruit."], "response": ["Sure! An apple."]}))
    assert {"reward", "member_0", "member_1", "member_2", "std"} <= set(out.columns)
    from importlib.metadata import version  # what `mlflow models serve` installs: this rmens, not any by the name

    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/rmens-smoke@linear-k3-r0")).read_text()
    assert f"rmens=={version('rmens')}" in requirements.split()


def test_report_and_curves_are_written(pipeline_runs):
    project, first, *_ = pipeline_runs
    report = first["report"]
    text = open(report).read()
    assert "linear-k3-r0" in text and "best_of_n" in text and "gold_at_N" in text
    bon = first["summaries"]["best_of_n"]
    assert "gold_at_N/linear-k3-r0/lcb1" in bon and "proxy_at_N/lora-k3-r0/uwo0.5" in bon
    assert "final_gold" in first["summaries"]["ppo:single/mean-r0"]  # the smoke preset's gold_every
    assert "win_rate" in first["summaries"]["eval:initial"]


def test_a_deleted_artifact_is_recomputed(harness, pipeline_runs):
    from flows.pipeline import pipeline

    project, first, *_ = pipeline_runs
    sample_dirs = list((project / "artifacts" / "sample").iterdir())
    shutil.rmtree(sample_dirs[0])
    again = pipeline(config=smoke(project))
    assert again["states"]["sample:bon"] == "Completed"
    assert (sample_dirs[0] / "done.json").is_file()


def test_retrain_promotes_only_a_better_model(harness, tmp_path):
    from flows.retrain import retrain

    base = {"project_dir": str(tmp_path), "registered_model": "rmens-retrain-test",
            "data": {"source": "synthetic", "max_pairs": 64, "val_fraction": 0.3},
            "ensemble": {"kind": "linear", "k": 2, "backbone": "tiny-random-llama", "max_length": 64},
            "train": {"lr": 0.002, "max_steps": 3, "batch_size": 8, "progress": False}}
    first = retrain(RetrainConfig.model_validate(base))
    assert first["promoted"] and first["reason"] == "no champion yet"
    client, _ = runs_of(tmp_path)
    aliases = lambda: client.get_registered_model("rmens-retrain-test").aliases  # noqa: E731
    assert aliases() == {"candidate": 1, "champion": 1, "ensemble": 1}
    again = retrain(RetrainConfig.model_validate(base))  # the same version: decided once, by the first run
    assert not again["promoted"] and again["decision"] == "already-decided" and "no champion yet" in again["reason"]
    assert all(state == "Cached" for state in again["states"].values())
    worse = retrain(RetrainConfig.model_validate(apply_overrides(base, ["train.lr=1e-7", "min_improvement=0.5"])))
    assert not worse["promoted"] and worse["reason"].startswith("kept the champion")
    assert worse["champion_version"] == first["champion_version"]
    # The rejected candidate is @candidate only: what consumers load (@champion, the label's alias) stays.
    assert aliases() == {"candidate": 2, "champion": 1, "ensemble": 1}
    client, runs = runs_of(tmp_path)
    latest = max(runs, key=lambda r: r.info.start_time if r.data.tags.get("rmens.decision") else 0)
    assert latest.data.tags["rmens.decision"] == "kept" and "kept the champion" in latest.data.tags["rmens.reason"]
    json.dumps(worse)


def test_two_concurrent_runs_of_one_step_compute_it_once(harness, tmp_path):
    from prefect import flow

    from rmens.data.config import DataConfig
    from rmens.pipeline.data import prepare_data
    from rmens.steps import step_key
    from tasks.runtime.paths import ProjectPaths
    from tasks.runtime.tracking import parent_run
    from tasks.steps import for_project

    paths = ProjectPaths.at(tmp_path).make()
    config = DataConfig(source="synthetic", max_pairs=32)
    inputs = {"data": config}

    @flow
    def twice():
        with parent_run(paths, "lock-test", config) as ctx:
            bound = for_project(prepare_data, paths)
            ctx = ctx.for_stage(step_key(prepare_data, inputs), "arms")
            futures = [bound.submit(ctx=ctx, step_name="prepare_data", label="arms", inputs=inputs) for _ in range(2)]
            for future in futures:
                future.wait()
            return [future.state for future in futures]

    states = twice()
    assert sorted(s.name for s in states) == ["Cached", "Completed"]
    assert states[0].result().path == states[1].result().path
    _, runs = runs_of(tmp_path)
    built = [r for r in runs if r.data.tags.get("rmens.stage") == "prepare_data"]
    assert len(built) == 1, "the waiting run read the result instead of building it again"


def test_experiment_flow_caches_every_step_and_tracks_each_in_mlflow(harness, tmp_path):
    from ae_data import instructions, synthetic_annotations, synthetic_grades

    from flows.experiment import experiment
    from rmens.experiment.config import load_experiment

    train = synthetic_annotations(tmp_path / "train", instructions(40))
    config = load_experiment("tiny", ["ppo_arms=[{arm: linear-k5}]"], data_dir=train,
                             mt_bench_grades=synthetic_grades(tmp_path / "grades.jsonl"))
    out = tmp_path / "experiment"
    first = experiment(config=config, out=str(out))
    assert first["states"] and all(state == "Completed" for state in first["states"].values()), first["states"]
    again = experiment(config=config, out=str(out))
    assert all(state == "Cached" for state in again["states"].values()), again["states"]
    logged = json.loads((out / "logged_bon.json").read_text())
    assert set(logged["judges"]) == {"ae1", "ae2"} and "linear-k5/uwo0.5" in logged["judges"]["ae1"]["arms"]
    client, runs = runs_of(out)
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == first["parent_run_id"]}
    assert {"pairs:pairs", "pools:pools", "train:gold", "train:linear-k5-r0", "train:linear-k5-r1", "twins:twins",
            "score_pools:lora-k5-all-r1", "rewards:rewards", "ppo_run:linear-k5/mean-r0",
            "ppo_eval:linear-k5/mean-r0", "experiment_report:report"} <= set(children)
    train_run = children["train:full-k3-r1"]
    assert [train_run.data.tags[f"rmens.{k}"] for k in ("arm", "kind", "k", "run")] == ["full-k3", "full", "3", "1"]
    assert train_run.data.metrics["train_wall_s"] > 0
    # a full arm's run: its members, trained in runs of their own, then their assembly, which counts their cost
    member = children["member:full-k3-r1/m2"]
    assert member.data.tags["rmens.member"] == "2" and member.data.metrics["train_peak_mib"] > 0
    assert train_run.data.params["members.2.key"] == member.data.tags["rmens.key"]
    assert train_run.data.metrics["train_wall_s"] > member.data.metrics["train_wall_s"]
    ppo_tags = children["ppo_run:linear-k5/mean-r0"].data.tags  # tagged as the pipeline tags its PPO runs
    assert [ppo_tags[f"rmens.{k}"] for k in ("arm", "run", "rule")] == ["linear-k5", "0", "mean"]
    assert train_run.data.params["ensemble.kind"] == "full"
    assert {a.path for a in client.list_artifacts(first["parent_run_id"])} >= {"logged_bon.json", "report.md"}
    assert "rewards_step" not in (out / "report.md").read_text() and (out / "logged_bon_ae2.png").is_file()
    # the same plan under the plain runner: the same keys, the same numbers
    from rmens.experiment.runner import run_experiment

    plain = run_experiment(config, tmp_path / "plain")
    assert len(plain["computed"]) == len(first["states"]) and not plain["reused"]
    ours, flows = _finished(tmp_path / "plain" / "artifacts"), _finished(out / "artifacts")
    assert set(ours) == set(flows)
    differ = [name for name in ours if not _same_numbers(ours[name], flows[name])]
    assert not differ, {name: (ours[name], flows[name]) for name in differ}
    assert json.loads((tmp_path / "plain" / "logged_bon.json").read_text()) == logged


def _finished(root: Path) -> dict[str, dict]:
    """Every finished output under a store root, `step/key`: its summary without what measures the machine
    (wall times, memory) or names a tracking record (the registered model's version)."""
    volatile = ("wall", "peak", "memory", "per_s", "model_version", "device")
    return {done.parent.relative_to(root).as_posix(): {k: v for k, v in json.loads(done.read_text())["summary"].items()
                                                       if not any(word in k for word in volatile)}
            for done in root.glob("*/*/done.json")}


def _differing(a: dict, b: dict, rel: float = 1e-4) -> list[str]:
    """The keys of `a` whose numbers are not within `rel` of `b`'s."""
    return [k for k in a if not _same_numbers({k: a[k]}, {k: b[k]} if k in b else {}, rel)]


def _same_numbers(a: dict, b: dict, rel: float = 1e-6) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or all(
        k in b and (a[k] == b[k] or (isinstance(a[k], float) and a[k] == pytest.approx(b[k], rel=rel, abs=1e-9)))
        for k in a)


def test_the_plain_runner_computes_what_prefect_computed_with_the_same_keys(pipeline_runs, tmp_path):
    """One plan, two runners: in-process without Prefect or MLflow, every step of the smoke pipeline gets the
    key (and so the folder name) the Prefect flow gave it, and the same numbers."""
    from rmens.pipeline.plan import run_pipeline
    from rmens.steps import Store
    from rmens.steps.runner import LocalRunner

    project, *_ = pipeline_runs
    plain = tmp_path / "plain"
    runner = LocalRunner(Store.of_project(plain))
    run_pipeline(smoke(project), runner)  # the first run's settings; its project_dir only names MLflow's store
    assert not runner.reused and len(runner.computed) == len(_finished(plain / "artifacts"))
    ours, flows = _finished(plain / "artifacts"), _finished(project / "artifacts")
    assert set(ours) <= set(flows)
    differ = [name for name in ours if not _same_numbers(ours[name], flows[name])]
    assert not differ, {name: (ours[name], flows[name]) for name in differ}


def test_the_runs_table_page_shows_every_arms_numbers_on_the_parent_run(pipeline_runs, tmp_path):
    """What a browser on `rmens ui`'s address gets, read through MLflow's REST API (the page's own calls):
    the experiment's parent runs, each with the per-arm metrics the runs table and charts compare."""
    import urllib.request

    from conftest import answers, free_port, wait_for

    from flows.services import runs_table_url

    project, first, *_ = pipeline_runs
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               f"sqlite:///{project}/mlflow.db", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(f"{base}/health") or server.poll() is not None, 120, "mlflow ui to start")
        assert server.poll() is None, "mlflow ui exited"
        client, _ = runs_of(project)
        experiment = client.get_experiment_by_name(f"rmens-{Path(project).name}").experiment_id
        assert runs_table_url(experiment, port) == f"{base}/#/experiments/{experiment}/runs"
        # the view `rmens ui` opens: MLflow's shared view, with the headline numbers as the table's columns
        from tasks.runtime.tracking import VIEW_TAG

        tags = json.loads(urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/experiments/get?experiment_id={experiment}", timeout=30).read())
        view = json.loads(next(t["value"] for t in tags["experiment"]["tags"] if t["key"] == VIEW_TAG))
        assert "metrics.`evaluate.win_rate/initial`" in view["selectedColumns"]
        body = json.dumps({"experiment_ids": [experiment], "max_results": 1000,
                           "filter": "tags.`rmens.flow` = 'pipeline:smoke'"}).encode()
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
        parents = json.loads(urllib.request.urlopen(request, timeout=30).read())["runs"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    first_parent = next(r for r in parents if r["info"]["run_id"] == first["parent_run_id"])
    assert all(r["data"].get("metrics") for r in parents), "every flow run's parent has the numbers"
    metrics = {m["key"] for m in first_parent["data"]["metrics"]}
    assert {"evaluate.win_rate/initial", "evaluate.win_rate/ppo:single/mean-r0",
            "train_ensemble.val_accuracy/lora-k3-r0", "best_of_n.gold_at_N/lora-k3-r0/uwo0.5"} <= metrics, \
        sorted(metrics)


def test_rmens_serve_serves_a_registered_model_by_its_alias(pipeline_runs):
    """`rmens serve models:/<name>@<alias>`: the registered version's weights, downloaded from the store that
    MLFLOW_TRACKING_URI names, behind the same endpoints as a folder."""
    import urllib.request

    from conftest import free_port

    project, *_ = pipeline_runs
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "models:/rmens-smoke@linear-k3-r0",
                             "--rule", "lcb1", "--port", str(port)], cwd=Path(__file__).parents[1], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving models:/rmens-smoke@linear-k3-r0 (k=3, rule lcb1)"), line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
            assert json.loads(response.read())["k"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_on_ray_independent_steps_overlap_on_distinct_devices_with_the_sequential_results(pipeline_runs, tmp_path):
    """`--ray local:gpus=2`: two declared devices on a machine without any. The arms' training steps run at
    once, each on its own CUDA_VISIBLE_DEVICES; the gold, given both devices, trains as two FSDP2 ranks; every
    output has the sequential run's key and numbers; a second run is served from the store without a Ray task."""
    pytest.importorskip("prefect_ray")
    from flows.pipeline import pipeline
    from rmens.config import derive
    from rmens.steps.resources_config import StepResources
    from tasks.runtime.placement import task_runner

    project, first, *_ = pipeline_runs
    ray_project = tmp_path / "ray"
    on_ray = pipeline.with_options(task_runner=task_runner("local:gpus=2"))
    config = derive(smoke(ray_project), resources={"train_ensemble:gold": StepResources(devices=2)})
    result = on_ray(config=config)
    assert set(result["states"]) == set(first["states"]) and set(result["states"].values()) == {"Completed"}
    ours, sequential = _finished(ray_project / "artifacts"), _finished(project / "artifacts")
    assert set(ours) <= set(sequential)
    # Equal up to float32 reductions: a Ray worker computes with other thread counts (measured: 3.4e-6 relative).
    # The gold's two ranks reduce its gradients in another order: after its 20 steps its weights differ by up to
    # 3.9e-5 and its scores' centre by 1.1e-4 of their spread (measured), which every gold number downstream
    # carries (gold_at_N, final_gold: 1.2e-4 relative).
    differ = [name for name in ours if not (_same_numbers(ours[name], sequential[name], rel=1e-4) or _same_numbers(
        ours[name], sequential[name], rel=1e-3) and all("gold" in k for k in _differing(ours[name], sequential[name])))]
    assert not differ, {name: (ours[name], sequential[name]) for name in differ}

    _, runs = runs_of(ray_project)
    trained = [r for r in runs if r.data.tags.get("rmens.stage") == "train_ensemble" and "rmens.devices" in r.data.tags]
    assert len(trained) == 4  # the gold and three arms, each on a granted device
    spans = sorted((r.info.start_time, r.info.end_time, r.data.tags["rmens.devices"]) for r in trained)
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if b[0] < a[1]]
    assert overlapping and all(not set(a[2].split(",")) & set(b[2].split(",")) for a, b in overlapping)
    ranks = {r.data.tags["rmens.label"]: (r.data.tags["rmens.devices"], r.data.tags["rmens.ranks"]) for r in trained}
    assert ranks.pop("gold") in {("0,1", "2"), ("1,0", "2")} and set(ranks.values()) <= {("0", "1"), ("1", "1")}
    assert len(list((ray_project / "artifacts").glob("train_ensemble/*/ensemble.launch/rank1.json"))) == 1

    again = on_ray(config=config)
    assert set(again["states"].values()) == {"Cached"}
    _, after = runs_of(ray_project)
    before = {r.info.run_id for r in runs}
    assert not [r for r in after if "rmens.devices" in r.data.tags and r.info.run_id not in before]
