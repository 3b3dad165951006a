"""The pipeline's judge config (and the trained judge, if any) as a Judge object."""

from __future__ import annotations

from pathlib import Path

from rmens.config import JudgeConfig
from rmens.steps import Output


def load_judge(cfg: JudgeConfig, trained: Output | None):
    """-> a rmens.evaluation.judges.Judge."""
    from rmens.data.loaders import data_root
    from rmens.evaluation.judges import AlpacaEvalJudge, LocalLLMJudge, RewardModelJudge, load_judge_prompts

    if cfg.kind == "reward_model":
        if trained is None:
            raise ValueError("judge.kind='reward_model' needs the trained judge artifact")
        return RewardModelJudge(trained.require().file("ensemble"), name="judge")
    if cfg.kind == "hf_reward_model":
        return RewardModelJudge(cfg.model, name=cfg.model)
    if cfg.kind == "alpaca_eval":
        return AlpacaEvalJudge(cfg.annotators_config)
    from rmens.models.backbone import load_policy, load_tokenizer

    root = data_root()
    if root is None or not (root / "mt_bench" / "judge_prompts.jsonl").is_file():
        raise FileNotFoundError("judge.kind='local_llm' needs FastChat's judge_prompts.jsonl under "
                                "$RMENS_DATA_DIR/mt_bench")
    return LocalLLMJudge(load_judge_prompts(root / "mt_bench" / "judge_prompts.jsonl"),
                         load_policy(cfg.model), load_tokenizer(cfg.model, padding_side="left"), name=cfg.model,
                         max_unparsed_fraction=cfg.max_unparsed_fraction)


def write_unparsed(folder: Path, judge) -> int:
    """The judge's unparsed outputs (one record per item: where, index, instruction and raw output prefixes)
    -> folder/unparsed.jsonl when there are any; their count. Judges other than local_llm have none."""
    from rmens.io import write_jsonl

    records = getattr(judge, "unparsed", None) or []
    if records:
        write_jsonl(Path(folder) / "unparsed.jsonl", records)
    return len(records)
