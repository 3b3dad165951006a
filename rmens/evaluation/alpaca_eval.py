"""AlpacaEval win rates: a model's outputs against reference outputs, judged pairwise, with alpaca_eval's
own metric functions.

Offline, alpaca_eval's `evaluate()` cannot run (it loads the evaluation set from the hub and defaults to
an OpenAI judge), so preferences come from our judge and go into `alpaca_eval.metrics.get_winrate`.
The length-controlled win rate is attempted with alpaca_eval's `get_length_controlled_winrate`; when
it cannot be computed (offline it needs files from the hub; it needs each instruction's position in
AlpacaEval's evaluation set) the exact reason is returned instead.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from rmens.data.schema import DataError
from rmens.evaluation.judges import Judge, LocalLLMJudge
from rmens.io import write_json

log = logging.getLogger(__name__)


def write_model_outputs(path: str | Path, instructions: list[str], outputs: list[str], generator: str,
                        datasets: list[str] | None = None) -> Path:
    """alpaca_eval's model_outputs.json: a list of {instruction, output, generator, dataset}."""
    if len(instructions) != len(outputs):
        raise ValueError(f"{len(instructions)} instructions but {len(outputs)} outputs")
    rows = [{"instruction": i, "output": o, "generator": generator, "dataset": (datasets or [None] * len(outputs))[n]}
            for n, (i, o) in enumerate(zip(instructions, outputs))]
    return write_json(path, rows, ensure_ascii=False)


def annotations_frame(instructions, references, outputs, p_model_wins: torch.Tensor, generator: str,
                      reference_generator: str, annotator: str) -> pd.DataFrame:
    """alpaca_eval's annotation layout: output_1 is the reference; preference = 1 + P(output_2 wins)."""
    return pd.DataFrame({
        "instruction": instructions, "output_1": references, "generator_1": reference_generator,
        "output_2": outputs, "generator_2": generator, "annotator": annotator,
        "preference": (1.0 + p_model_wins.double()).tolist(),
    })


@functools.cache
def _lc_unavailable() -> str | None:
    """Why the LC win rate cannot be computed here, or None. alpaca_eval downloads df_gamed.csv from the
    Hugging Face hub; without the file in the HF cache and without a network, say so at once instead of
    letting the hub client retry for half a minute per evaluation."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache("tatsu-lab/alpaca_eval", "df_gamed.csv", repo_type="dataset"), str):
            return None
    except Exception:  # noqa: BLE001 - an unusual cache layout is not a reason to fail the evaluation
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set and df_gamed.csv is not in the Hugging Face cache"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return None
    except OSError as err:
        return f"huggingface.co is unreachable ({err}) and df_gamed.csv is not in the Hugging Face cache"


def evaluation_set_positions(instructions: list[str]) -> tuple[list[int] | None, str | None]:
    """Each instruction's position in AlpacaEval's 805-instruction evaluation set, or (None, why not): its
    line in the data folder's instructions.jsonl, which lists the set in alpaca_eval's order (the order of its
    reference outputs, e.g. gpt4_1106_preview_model_outputs.json)."""
    from rmens.data.prompts import alpaca_eval_instructions

    try:
        order = {row["instruction"]: n for n, row in enumerate(alpaca_eval_instructions())}
    except (DataError, OSError) as err:
        return None, f"AlpacaEval's instruction list is unavailable ({err})"
    missing = sum(instruction not in order for instruction in instructions)
    if missing:
        return None, f"{missing} of {len(instructions)} instructions are not in AlpacaEval's evaluation set"
    return [order[instruction] for instruction in instructions], None


def length_controlled(annotations: pd.DataFrame) -> tuple[dict | None, str | None]:
    """alpaca_eval's LC win rate, or (None, why it could not be computed). `annotations` must be indexed by
    each row's instruction position in AlpacaEval's evaluation set (see win_rate)."""
    reason = _lc_unavailable()
    if reason is not None:
        return None, ("alpaca_eval's get_length_controlled_winrate needs tatsu-lab/alpaca_eval/df_gamed.csv from "
                      f"the Hugging Face hub: {reason}")
    try:
        from alpaca_eval.metrics import get_length_controlled_winrate

        result = get_length_controlled_winrate(annotations, save_weights_dir=None)
        return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}, None
    except Exception as err:  # offline: hub download of df_gamed.csv fails; report it verbatim
        return None, f"alpaca_eval's get_length_controlled_winrate failed: {type(err).__name__}: {err}"[:500]


def win_rate(judge: Judge, instructions: list[str], outputs: list[str], references: list[str], *,
             generator: str = "model", reference_generator: str = "gpt4_1106_preview",
             output_dir: str | Path | None = None, instruction_index: Sequence[int] | None = None) -> dict:
    """Win rate (%) of `outputs` over `references` with standard error, from alpaca_eval's metrics.

    `instruction_index`: each instruction's position in AlpacaEval's 805-instruction evaluation set, which the
    length-controlled win rate needs (None: looked up by text with `evaluation_set_positions`; instructions
    that are not AlpacaEval's get no LC win rate, and the reason is returned)."""
    from alpaca_eval.metrics import get_winrate

    if not (len(instructions) == len(outputs) == len(references)) or not instructions:
        raise ValueError("win_rate needs equally many (non-zero) instructions, outputs and references")
    if instruction_index is not None and len(instruction_index) != len(instructions):
        raise ValueError(f"instruction_index has {len(instruction_index)} positions for {len(instructions)} "
                         "instructions")
    start = len(judge.unparsed) if isinstance(judge, LocalLLMJudge) else 0
    p_model = judge.compare(instructions, references, outputs)
    frame = annotations_frame(instructions, references, outputs, p_model, generator, reference_generator, judge.name)
    # alpaca_eval's LC model (metrics/glm_winrate.py, _get_featurized_data) makes the frame's index a column
    # (reset_index) and takes each row's instruction difficulty from df_gamed.csv by that label, a position in
    # AlpacaEval's evaluation set. So rows are indexed by their instruction's position: re-indexed 0..n-1, a
    # split, a subset or rows left out below would be paired with other instructions' difficulties.
    positions, no_positions = ((list(instruction_index), None) if instruction_index is not None
                               else evaluation_set_positions(instructions))
    if positions is not None:
        frame.index = pd.Index(positions)
    failed = int(frame["preference"].isna().sum())
    unparsed = {"unparsed": failed, "unparsed_fraction": failed / len(instructions)}
    if isinstance(judge, LocalLLMJudge):
        for record in judge.unparsed[start:]:
            record["part"] = "alpaca_eval"
        # Warns with the count; raises past judge.max_unparsed_fraction, before any number is reported.
        unparsed = judge.check_unparsed(judge.unparsed[start:], len(instructions), "AlpacaEval win rate")
    # A pair without a verdict is left out, not counted as a tie: a tie is a judgement the judge never made
    # and pulls the win rate toward 50%. Left out, the rate stays an average of real verdicts, unbiased as
    # long as failures do not depend on which output is better; the unparsed limit bounds how far a
    # dependence could move it, and the count is reported next to the rate.
    valid = frame.dropna(subset=["preference"])  # keeps each row's instruction position
    metrics = {k: float(v) for k, v in get_winrate(valid).items()}
    lc, lc_reason = length_controlled(valid) if no_positions is None else (
        None, f"alpaca_eval's get_length_controlled_winrate needs each instruction's position in AlpacaEval's "
              f"evaluation set: {no_positions}")
    result = {**metrics, "failed_annotations": failed, **unparsed, "judge": judge.name, "generator": generator,
              "reference": reference_generator, "length_controlled": lc, "length_controlled_unavailable": lc_reason,
              "avg_output_chars": sum(map(len, outputs)) / len(outputs)}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        frame.to_json(out / "annotations.json", orient="records", indent=2)
        write_model_outputs(out / "model_outputs.json", instructions, outputs, generator)
        write_json(out / "win_rate.json", result)
    if not math.isfinite(result.get("win_rate", math.nan)):
        log.warning("no valid annotations: win rate undefined")
    return result
