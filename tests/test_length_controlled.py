"""The length-controlled win rate pairs every annotation with its own instruction's difficulty.

alpaca_eval's GLM (metrics/glm_winrate.py) runs for real; only its download of df_gamed.csv is replaced by a
small stand-in, and its fitted model is wrapped to record the features it predicts from."""

import json

import pandas as pd
import pytest
import torch
from alpaca_eval.metrics import glm_winrate

from rmens.evaluation import alpaca_eval as ae
from rmens.evaluation.judges import Judge

N = 12  # instructions in the stand-in evaluation set (AlpacaEval has 805)
INSTRUCTIONS = [f"instruction {i}" for i in range(N)]


def difficulty(position: int) -> float:
    return position / 10


class FixedJudge(Judge):
    name = "fixed"

    def __init__(self, p_b):
        self.p_b = p_b

    def compare(self, instructions, a, b):
        return torch.tensor(self.p_b, dtype=torch.float64)


@pytest.fixture()
def lc_features(tmp_path, monkeypatch) -> list[list[float]]:
    """An offline alpaca_eval with a 12-instruction df_gamed.csv; returns the instruction_difficulty column of
    every design matrix the LC model predicts from."""
    gamed = pd.DataFrame([
        {"model": model, "index": i, "instruction_difficulty": difficulty(i), "preference": (i % 3) / 2,
         "std_delta_len": sign * (i + 1) / N, "not_gamed_baseline": False}
        for model, sign in (("verbose", -1.0), ("concise", 1.0)) for i in range(N)])
    gamed.to_csv(tmp_path / "df_gamed.csv", index=False)
    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **kwargs: str(tmp_path / "df_gamed.csv"))
    monkeypatch.setattr(ae, "_lc_unavailable", lambda: None)

    seen = []
    fit = glm_winrate.fit_LogisticRegressionCV

    class Recording:
        def __init__(self, model):
            self.model, self.coef_ = model, model.coef_

        def predict_proba(self, features):
            seen.append(features["instruction_difficulty"].tolist())
            return self.model.predict_proba(features)

    monkeypatch.setattr(glm_winrate, "fit_LogisticRegressionCV", lambda *a, **k: Recording(fit(*a, **k)))
    folder = tmp_path / "data" / "alpaca_eval"
    folder.mkdir(parents=True)
    (folder / "instructions.jsonl").write_text("".join(json.dumps({"instruction": i, "split": "test"}) + "\n"
                                                       for i in INSTRUCTIONS))
    monkeypatch.setenv("RMENS_DATA_DIR", str(tmp_path / "data"))
    return seen


def win_rate(positions, p_b, **kwargs):
    instructions = [INSTRUCTIONS[i] for i in positions]
    return ae.win_rate(FixedJudge(p_b), instructions, [f"answer {i} " * (i + 1) for i in positions],
                       [f"ref {i}" for i in positions], **kwargs)


def test_a_subset_keeps_its_instructions_difficulties(lc_features):
    # Instructions 3, 7, 9 and 11; 7 has no verdict and is left out.
    result = win_rate([3, 7, 9, 11], [1.0, float("nan"), 0.0, 0.75])
    assert result["length_controlled"] is not None, result["length_controlled_unavailable"]
    assert lc_features == [[difficulty(3), difficulty(9), difficulty(11)]]


def test_given_positions_are_used(lc_features):
    result = ae.win_rate(FixedJudge([1.0, 0.0, 0.5]), ["a", "b", "c"], ["x", "yy", "zzz"], ["r", "r", "r"],
                         instruction_index=[10, 2, 5])
    assert result["length_controlled"] is not None, result["length_controlled_unavailable"]
    assert lc_features == [[difficulty(10), difficulty(2), difficulty(5)]]
    with pytest.raises(ValueError, match="instruction_index has 1 positions for 3 instructions"):
        ae.win_rate(FixedJudge([1.0, 0.0, 0.5]), ["a", "b", "c"], ["x", "y", "z"], ["r", "r", "r"],
                    instruction_index=[10])


def test_instructions_outside_the_evaluation_set_get_no_lc_win_rate(lc_features):
    result = ae.win_rate(FixedJudge([1.0, 0.0]), [INSTRUCTIONS[0], "not an AlpacaEval instruction"],
                         ["x", "y"], ["r", "r"])
    assert result["length_controlled"] is None and lc_features == []
    assert "1 of 2 instructions are not in AlpacaEval's evaluation set" in result["length_controlled_unavailable"]
    assert result["win_rate"] == pytest.approx(50.0)
