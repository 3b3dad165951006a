import gzip
import json

import pytest
import torch
from conftest import real_data_dir, requires_real_data

from rmens.data import prepare_pairs
from rmens.data.config import DataConfig
from rmens.data.loaders import (
    hf_record_to_pair,
    load_alpaca_eval_pairs,
    load_jsonl_pairs,
    load_pairs,
    preference_to_pair,
)
from rmens.data.schema import DataError, PreferencePair, validate_pair
from rmens.data.splits import flip_labels, is_alpaca_eval_test, member_weights, split_by_instruction
from rmens.io import write_json


def test_validate_pair_accepts_good_record_and_keeps_extra_fields_as_source():
    pair = validate_pair({"prompt": "p", "chosen": "a", "rejected": "b", "id": 7}, "rec 1")
    assert pair == PreferencePair("p", "a", "b", 1.0)
    assert pair.source == {"id": 7}


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "identical"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "weight": 0.2}, "must lie in [0.5, 1]"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "weight": float("nan")}, "finite"),
    (["p", "a", "b"], "expected an object"),
])
def test_validate_pair_errors_name_record_and_field(record, message):
    with pytest.raises(DataError, match="rec 9") as err:
        validate_pair(record, "rec 9")
    assert message in str(err.value)


def test_jsonl_loader_names_the_bad_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'chosen' is empty"):
        load_jsonl_pairs(path)
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:2: invalid JSON"):
        load_jsonl_pairs(path)
    path.write_text("\n")
    with pytest.raises(DataError, match="no preference pairs"):
        load_jsonl_pairs(path)
    with pytest.raises(FileNotFoundError):
        load_jsonl_pairs(tmp_path / "missing.jsonl")


def test_jsonl_loader_reads_weights_and_source(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "weight": 0.75,
                                "source": {"who": "me"}}) + "\n")
    [pair] = load_jsonl_pairs(path)
    assert pair.weight == 0.75 and pair.source == {"who": "me"}


def test_write_json_keeps_the_text_json_dumps_wrote(tmp_path):
    obj = {"name": "café", "values": [1, 2.5, None]}
    assert write_json(tmp_path / "a" / "x.json", obj).read_text() == json.dumps(obj, indent=2)
    assert write_json(tmp_path / "y.json", obj, indent=None).read_text() == json.dumps(obj)
    assert (write_json(tmp_path / "z.json", obj, ensure_ascii=False).read_text(encoding="utf-8")
            == json.dumps(obj, indent=2, ensure_ascii=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "y.json", "z.json"]  # no .partial left


@pytest.mark.parametrize("pref, chosen, weight_hard, weight_soft", [
    (1, "one", 1.0, 1.0),
    (2, "two", 1.0, 1.0),
    (1.2, "one", 1.0, 0.8),
    (1.9, "two", 1.0, 0.9),
])
def test_preference_mapping(pref, chosen, weight_hard, weight_soft):
    hard = preference_to_pair("q", "one", "two", pref, where="r")
    soft = preference_to_pair("q", "one", "two", pref, where="r", soft_labels=True)
    assert hard.chosen == chosen and hard.weight == weight_hard
    assert soft.chosen == chosen and soft.weight == pytest.approx(weight_soft)


def test_draws_are_dropped_or_kept_at_half_weight():
    for draw in (0, 1.5):
        assert preference_to_pair("q", "one", "two", draw, where="r") is None
        kept = preference_to_pair("q", "one", "two", draw, where="r", draws="weight")
        assert kept.weight == 0.5


@pytest.mark.parametrize("bad", [3, -1, 0.5, "2", None, True])
def test_preference_outside_allowed_set_is_an_error(bad):
    with pytest.raises(DataError, match="rec 4"):
        preference_to_pair("q", "one", "two", bad, where="rec 4")


def _write_ae(folder, records, name="ae1_gpt4_pairs.train.jsonl.gz"):
    with gzip.open(folder / name, "wt") as handle:
        for rec in records:
            handle.write(json.dumps(rec) + "\n")


def _ae(instr, out1, out2, pref, gen="modelA"):
    return {"instruction": instr, "dataset": "d", "output_1": out1, "generator_1": "ref",
            "output_2": out2, "generator_2": gen, "preference": pref, "annotator": "gpt4"}


def test_alpaca_eval_loader_filters_and_counts(tmp_path):
    from collections import Counter

    _write_ae(tmp_path, [
        _ae("i1", "ref answer", "long good answer", 2),
        _ae("i2", "ref answer", "bad", 1),
        _ae("i3", "same", "same", 1.5),                      # self-pair
        _ae("i4", "", "x", 2),                               # empty output
        _ae("i5", "ref", "nonsense", 2, gen="example"),       # adversarial NullModel
        _ae("i6", "a", "b", 0),                              # draw
        _ae("i7", "a", "b", 2, gen="modelB"),
    ])
    stats = Counter()
    pairs = load_alpaca_eval_pairs(tmp_path, "ae1", stats=stats)
    assert [p.prompt for p in pairs] == ["i1", "i2", "i7"]
    assert pairs[0].chosen == "long good answer" and pairs[1].chosen == "ref answer"
    assert pairs[0].source["generator_2"] == "modelA"
    assert stats == Counter(kept=3, self_pair=1, empty_output=1, filtered_generator=1, draw_dropped=1)
    only_b = load_alpaca_eval_pairs(tmp_path, "ae1", include_generators=["modelB"])
    assert [p.prompt for p in only_b] == ["i7"]
    with_draws = load_alpaca_eval_pairs(tmp_path, "ae1", draws="weight")
    assert [p.weight for p in with_draws if p.prompt == "i6"] == [0.5]


def test_alpaca_eval_loader_rejects_bad_preference_with_line(tmp_path):
    _write_ae(tmp_path, [_ae("i1", "a", "b", 2), _ae("i2", "a", "b", 7)])
    with pytest.raises(DataError, match=r"ae1_gpt4_pairs.train.jsonl.gz:2: preference 7"):
        load_alpaca_eval_pairs(tmp_path, "ae1")


def test_hf_layouts_map_to_pairs():
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    pair = hf_record_to_pair(hh, "hh[0]")
    assert pair.prompt == "\n\nHuman: hi\n\nAssistant:" and pair.chosen == "hello there"
    farm = {"instruction": "Add", "input": "1+1", "output_1": "2", "output_2": "3", "preference": 1}
    pair = hf_record_to_pair(farm, "farm[0]")
    assert pair.prompt == "Add\n\n1+1" and pair.chosen == "2" and pair.rejected == "3"
    with pytest.raises(DataError, match=r"x\[3\]: unrecognised"):
        hf_record_to_pair({"text": "a"}, "x[3]")


def test_split_is_by_instruction_and_deterministic(pairs):
    doubled = pairs + [PreferencePair(p.prompt, p.chosen + " more", p.rejected) for p in pairs]
    train, held = split_by_instruction(doubled, 0.3)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held})
    assert 0.1 < len(held) / len(doubled) < 0.5
    again = split_by_instruction(list(reversed(doubled)), 0.3)[1]
    assert {p.prompt for p in again} == {p.prompt for p in held}
    assert split_by_instruction(doubled, 0.3, salt="other")[1] != held


def test_flip_labels_flips_exact_seeded_fraction(pairs):
    flipped = flip_labels(pairs, 0.25, seed=3)
    changed = [i for i, (a, b) in enumerate(zip(pairs, flipped)) if a.chosen != b.chosen]
    assert len(changed) == round(0.25 * len(pairs))
    assert all(flipped[i].chosen == pairs[i].rejected and flipped[i].source["label_flipped"] for i in changed)
    assert flip_labels(pairs, 0.25, seed=3) == flipped
    assert flip_labels(pairs, 0.25, seed=4) != flipped


def test_member_weights_modes():
    assert torch.equal(member_weights(10, 3, "seed", 0), torch.ones(3, 10))
    boot = member_weights(50, 3, "bootstrap", 0)
    assert boot.sum(dim=1).tolist() == [50.0] * 3 and (boot == 0).any()
    assert not torch.equal(boot[0], boot[1])
    disjoint = member_weights(10, 3, "disjoint", 0)
    assert disjoint.sum(dim=0).tolist() == [1.0] * 10 and sorted(disjoint.sum(dim=1).tolist()) == [3, 3, 4]
    with pytest.raises(ValueError, match="at least k=3"):
        member_weights(2, 3, "disjoint", 0)


def test_prepare_pairs_applies_noise_to_train_only():
    cfg = DataConfig(source="synthetic", max_pairs=80, val_fraction=0.25, label_noise=0.5)
    train, val = prepare_pairs(cfg)
    assert sum(p.source.get("label_flipped", False) for p in train) == round(0.5 * len(train))
    assert not any(p.source.get("label_flipped") for p in val)


def test_data_config_errors():
    with pytest.raises(ValueError, match="needs data.path"):
        DataConfig(source="jsonl")
    with pytest.raises(ValueError, match="label_noise"):
        DataConfig(label_noise=1.5)


@requires_real_data
def test_real_alpaca_eval_data_loads_and_split_rule_matches():
    root = real_data_dir()
    rows = [json.loads(line) for line in (root / "alpaca_eval" / "instructions.jsonl").open()]
    assert all(is_alpaca_eval_test(r["instruction"]) == (r["split"] == "test") for r in rows)
    pairs = load_pairs(DataConfig(source="alpaca_eval", path=str(root / "alpaca_eval"), max_pairs=500, seed=1))
    assert len(pairs) == 500
    assert not any(is_alpaca_eval_test(p.prompt) for p in pairs)
    assert not any(p.source["generator_2"] in ("example", "gpt4_gamed") for p in pairs)
