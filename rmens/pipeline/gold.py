"""The pipeline's gold (the reference that scores policies and Best-of-n picks) as a Judge object, and the
files outside the store it reads."""

from __future__ import annotations

from pathlib import Path

from rmens.data.sources import model_paths
from rmens.pipeline.config import GoldConfig
from rmens.steps import Output


def load_gold(cfg: GoldConfig, trained: Output | None):
    """-> a rmens.evaluation.judges.Judge."""
    from rmens.data.loaders import data_root
    from rmens.evaluation.judges import AlpacaEvalJudge, LocalLLMJudge, RewardModelJudge, load_judge_prompts

    if cfg.kind == "reward_model":
        if trained is None:
            raise ValueError("gold.kind='reward_model' needs the trained gold artifact")
        return RewardModelJudge(trained.require().file("ensemble"), name="gold")
    if cfg.kind == "hf_reward_model":
        return RewardModelJudge(cfg.model, name=cfg.model)
    if cfg.kind == "alpaca_eval":
        return AlpacaEvalJudge(cfg.annotators_config)
    from rmens.models.backbone import load_policy, load_tokenizer

    root = data_root()
    if root is None or not (root / "mt_bench" / "judge_prompts.jsonl").is_file():
        raise FileNotFoundError("gold.kind='local_llm' needs FastChat's judge_prompts.jsonl under "
                                "$RMENS_DATA_DIR/mt_bench")
    return LocalLLMJudge(load_judge_prompts(root / "mt_bench" / "judge_prompts.jsonl"),
                         load_policy(cfg.model), load_tokenizer(cfg.model, padding_side="left"), name=cfg.model,
                         max_unparsed_fraction=cfg.max_unparsed_fraction)


def gold_paths(cfg: GoldConfig | None) -> list[Path]:
    """Files outside the store the gold reads (a step that loads it declares them): a local model folder, and
    for local_llm FastChat's judge prompts."""
    from rmens.data.loaders import data_root

    if cfg is None:
        return []
    if cfg.kind == "local_llm":
        prompts = [data_root() / "mt_bench" / "judge_prompts.jsonl"] if data_root() is not None else []
        return prompts + model_paths(cfg.model)
    return model_paths(cfg.model) if cfg.kind == "hf_reward_model" else []


def write_unparsed(folder: Path, judge) -> int:
    """The judge's unparsed outputs (one record per item: where, index, instruction and raw output prefixes)
    -> folder/unparsed.jsonl when there are any; their count. Judges other than local_llm have none."""
    from rmens.io import write_jsonl

    records = getattr(judge, "unparsed", None) or []
    if records:
        write_jsonl(Path(folder) / "unparsed.jsonl", records)
    return len(records)
