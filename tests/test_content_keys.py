"""Files a config names are in the keys of the steps that read them, by content (issue: stale results
after a data file was rewritten in place)."""

import json
import os

from rmens.data.loaders import synthetic_pairs
from rmens.io import write_jsonl
from rmens.pipeline.config import load_preset
from rmens.pipeline.plan import run_pipeline
from rmens.steps import Store
from rmens.steps.runner import check


def _keys(config, store) -> dict[str, str]:
    return {name: output.key for name, output in check(run_pipeline, store, config).outputs.items()}


def test_a_data_file_rewritten_in_place_rekeys_exactly_the_steps_downstream(tmp_path, monkeypatch):
    monkeypatch.setenv("RMENS_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs.jsonl"
    rows = [p.to_dict() for p in synthetic_pairs(40, seed=3)]
    write_jsonl(pairs, rows)
    config = load_preset("smoke", [f"project_dir={tmp_path}", "data.source=jsonl", f"data.path={pairs}",
                                   "ppo_arms=[single]"])
    store = Store.of_project(tmp_path)
    before = _keys(config, store)
    stat = pairs.stat()
    os.utime(pairs, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes: same keys
    assert _keys(config, store) == before
    swapped = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]
    write_jsonl(pairs, swapped)  # the same size, chosen and rejected swapped
    after = _keys(config, store)
    changed = {name for name in before if before[name] != after[name]}
    assert {"prepare_data:arms", "train_ensemble:linear-k3-r0", "score:lora-k3-r0", "best_of_n:bon",
            "ppo:single/mean-r0", "evaluate:ppo:single/mean-r0", "report:report"} <= changed
    # what does not read the file or anything made from it keeps its key: models, the gold, the samples
    assert not changed & {"prepare_models:models", "prepare_data:gold", "train_ensemble:gold", "sample:bon",
                          "score:gold", "evaluate:initial"}


def test_a_local_model_folder_is_keyed_by_its_files(tmp_path, monkeypatch):
    from rmens.steps.content import content_digests

    monkeypatch.setenv("RMENS_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"a": 1}))
    (model / "weights.bin").write_bytes(b"\1" * 64)
    first = content_digests([model])
    assert content_digests([model]) == first and (tmp_path / "cache" / "content-hashes.json").is_file()
    (model / "weights.bin").write_bytes(b"\2" * 64)
    assert content_digests([model]) != first
    assert content_digests([tmp_path / "gone"]) == {str((tmp_path / "gone").resolve()): "missing"}
