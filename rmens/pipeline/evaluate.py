"""Pipeline step: evaluate one policy (or one Best-of-n selection) with the gold: AlpacaEval-style win rate
against reference outputs, MT-Bench grades, and for PPO runs the gold/proxy-versus-KL curve."""

from __future__ import annotations

from pathlib import Path

from rmens.data.loaders import data_root
from rmens.data.sources import alpaca_eval_paths, engine_paths, model_paths
from rmens.io import read_jsonl, write_json, write_jsonl
from rmens.pipeline.config import EvalConfig, GoldConfig, Selection
from rmens.pipeline.gold import gold_paths, load_gold, write_unparsed
from rmens.seeding import Stream
from rmens.steps import Output, step


def eval_set(cfg: EvalConfig) -> tuple[list[str], list[str]]:
    """(instructions, reference outputs) of the evaluation split."""
    from rmens.data.loaders import synthetic_pairs
    from rmens.data.prompts import alpaca_eval_instructions, reference_outputs

    if cfg.source == "synthetic":
        pairs = synthetic_pairs(cfg.max_instructions or 16, seed=1234)
        return [p.prompt for p in pairs], [p.chosen for p in pairs]
    rows = alpaca_eval_instructions(cfg.split)
    if cfg.max_instructions:
        rows = rows[: cfg.max_instructions]
    refs = reference_outputs(cfg.reference)
    return [r["instruction"] for r in rows], [refs[r["instruction"]] for r in rows]


def _mt_bench_source(cfg: EvalConfig) -> str | None:
    if cfg.mt_bench_path:
        return cfg.mt_bench_path
    root = data_root()
    return str(root / "mt_bench") if root and (root / "mt_bench" / "question.jsonl").is_file() else None


def eval_paths(cfg: EvalConfig) -> list[Path]:
    """Files outside the store an evaluation reads: the AlpacaEval folder and the MT-Bench questions."""
    mt_bench = [Path(cfg.mt_bench_path)] if cfg.mt_bench_path else (
        [data_root() / "mt_bench"] if data_root() is not None and cfg.mt_bench else [])
    return (alpaca_eval_paths(None) if cfg.source == "alpaca_eval" else []) + mt_bench


def mt_bench_questions(cfg: EvalConfig, gold_cfg: GoldConfig) -> tuple[list[dict], str | None]:
    """The MT-Bench questions to answer, or why none are (a gold that cannot grade, no questions found)."""
    from rmens.evaluation import mt_bench

    if not cfg.mt_bench:
        return [], None
    if gold_cfg.kind == "alpaca_eval":
        return [], "alpaca_eval annotators compare pairs and cannot grade; use a local_llm gold"
    source = _mt_bench_source(cfg)
    if source is None:
        return [], "no MT-Bench questions: set evaluate.mt_bench_path or RMENS_DATA_DIR"
    return mt_bench.load_questions(source)[: cfg.mt_bench_questions], None


def grade_mt_bench(cfg: EvalConfig, gold, questions: list[dict], answers: list[dict], instructions, references,
                   folder: Path) -> dict:
    """MT-Bench answers graded by the gold (a Judge object)."""
    from rmens.evaluation import mt_bench
    from rmens.evaluation.judges import LocalLLMJudge

    source = _mt_bench_source(cfg)
    mapping = None if isinstance(gold, LocalLLMJudge) else \
        mt_bench.RewardScoreMapping.calibrate(gold, instructions, references)
    refs = mt_bench.load_reference_answers(source) if Path(source).is_dir() else {}
    grades = mt_bench.grade(gold, questions, answers, refs, mapping)
    summary = mt_bench.summarize(grades)
    write_jsonl(folder / "mt_bench_answers.jsonl", answers)
    write_json(folder / "mt_bench.json", {"summary": summary, "grades": grades,
                                         "mapping": mapping.__dict__ if mapping else None})
    return summary


@step("evaluate", devices=1, memory_gib=4,
      files={"alpaca_eval": "alpaca_eval", "ppo_points": "ppo_points.json"},
      reads=lambda eval_cfg, gold_cfg, policy=None, **_: eval_paths(eval_cfg) + gold_paths(gold_cfg)
      + model_paths(policy) + engine_paths(eval_cfg.generation))
def evaluate(folder: Path, *, label: str, eval_cfg: EvalConfig, gold_cfg: GoldConfig, gold: Output | None,
             policy: str | None = None, ppo_run: Output | None = None, bon: Output | None = None,
             bon_selection: Selection | None = None, proxy: Output | None = None) -> dict:
    """Exactly one source: `policy` (a model), `ppo_run` (its trained policy and checkpoints), or `bon` with
    `bon_selection` (which of the best_of_n step's picks)."""
    if sum(x is not None for x in (policy, ppo_run, bon)) != 1:
        raise ValueError("evaluate needs exactly one of policy, ppo_run or bon")
    # Every answer is drawn before the gold loads, so that a vLLM engine has the device to itself and its memory
    # is free again when the gold judges
    if gold is not None:
        gold.require()  # gone: fail now, not after every answer was drawn
    instructions, references = eval_set(eval_cfg)
    outputs, questions, mt_answers, skipped = _answers(eval_cfg, gold_cfg, instructions, policy, ppo_run, bon,
                                                       bon_selection)
    judge = load_gold(gold_cfg, gold)  # the gold as a rmens.evaluation.judges.Judge
    try:
        summary = _judge_all(folder, judge, label, eval_cfg, instructions, references, outputs, questions,
                             mt_answers, ppo_run, proxy)
    finally:  # also when judging failed on too many unparsed outputs: the records show what the gold wrote
        unparsed = write_unparsed(folder, judge)
    return {**summary, **({"mt_bench_skipped": skipped} if skipped else {}), "gold_unparsed": unparsed}


def _answers(eval_cfg: EvalConfig, gold_cfg: GoldConfig, instructions: list[str], policy: str | None,
             ppo_run: Output | None, bon: Output | None, bon_selection: Selection | None):
    """(the evaluated outputs, MT-Bench questions, their answers, why MT-Bench is skipped if it is)."""
    from rmens.evaluation import mt_bench
    from rmens.generation import open_sampler

    if bon is not None:
        picked = {row["prompt"]: row["response"]
                  for row in read_jsonl(bon.require().file("selected") / bon_selection.file_name)}
        missing = [i for i in instructions if i not in picked]
        if missing:
            raise ValueError(f"the Best-of-n samples do not cover {len(missing)} evaluation instructions; "
                             "draw them on the evaluation split (bon_prompts)")
        return [picked[i] for i in instructions], [], [], None
    questions, skipped = mt_bench_questions(eval_cfg, gold_cfg)
    path = str(ppo_run.require().file("policy")) if ppo_run is not None else policy
    with open_sampler(path, eval_cfg.generation) as sampler:
        outputs = sampler(instructions, eval_cfg.generation, stream=Stream.EVAL_SAMPLE).texts
        answers = mt_bench.answer_questions(sampler, questions, eval_cfg.generation) if questions else []
    return outputs, questions, answers, skipped


def _judge_all(folder: Path, judge, label: str, eval_cfg: EvalConfig, instructions: list[str],
               references: list[str], outputs: list[str], questions: list[dict], mt_answers: list[dict],
               ppo_run: Output | None, proxy: Output | None) -> dict:
    from rmens.evaluation import alpaca_eval
    from rmens.evaluation.curves import curve_from_points, save_curves

    summary: dict = {}
    if eval_cfg.alpaca_eval:
        wr = alpaca_eval.win_rate(judge, instructions, outputs, references, generator=label,
                                  reference_generator=eval_cfg.reference if eval_cfg.source == "alpaca_eval"
                                  else "synthetic-reference", output_dir=folder / "alpaca_eval")
        summary.update({"win_rate": wr["win_rate"], "win_rate_se": wr["standard_error"],
                        "avg_output_chars": wr["avg_output_chars"], "win_rate_unparsed": wr["unparsed"],
                        "win_rate_unparsed_fraction": wr["unparsed_fraction"]})
        if wr["length_controlled"]:
            summary["lc_win_rate"] = wr["length_controlled"].get("length_controlled_winrate", float("nan"))
        else:
            summary["lc_win_rate_unavailable"] = wr["length_controlled_unavailable"]
    if questions:
        mt = grade_mt_bench(eval_cfg, judge, questions, mt_answers, instructions, references, folder)
        summary.update({f"mt_bench_{k}": v for k, v in mt.items() if isinstance(v, (int, float, str))})
    if ppo_run is not None and proxy is not None:
        from rmens.evaluation.ppo_eval import evaluate_run
        from rmens.reward import EnsembleReward

        proxy_fn = EnsembleReward.from_folder(proxy.file("ensemble"))
        points = evaluate_run(ppo_run.file("run"), instructions[:8], {"gold": judge, "proxy": proxy_fn},
                              reward_folder=proxy.file("ensemble"))
        write_json(folder / "ppo_points.json", points)
        save_curves(curve_from_points(points, ["gold", "proxy"]), "rl", folder / "ppo_curve", f"PPO: {label}")
    return summary
