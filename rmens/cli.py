"""The `rmens` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from rmens.config import TrainJobConfig, apply_overrides, load_yaml


def _job_config(model, args) -> object:
    data = load_yaml(args.config) if args.config else {}
    return model.model_validate(apply_overrides(data, args.set or []))


def cmd_train(args) -> int:
    from rmens.data import prepare_pairs
    from rmens.training.trainer import train_ensemble

    cfg = _job_config(TrainJobConfig, args)
    output = args.output or cfg.output_dir
    train, val = prepare_pairs(cfg.data)
    logging.info("training %s k=%d on %d pairs (%d held out)", cfg.ensemble.kind, cfg.ensemble.k, len(train), len(val))
    result = train_ensemble(cfg.ensemble, cfg.train, train, val, output)
    if result.metrics:
        summary = {key: result.metrics[key] for key in ("accuracy", "member_accuracy", "ece", "n_pairs")}
        print(json.dumps({"output": str(Path(output).resolve()), **summary,
                          "wall_time_s": round(result.wall_time, 1)}, indent=2))
    return 0


def cmd_ppo(args) -> int:
    from rmens.data.prompts import load_prompts
    from rmens.ppo.config import PPOJobConfig
    from rmens.ppo.trainer import PPOTrainer
    from rmens.reward import EnsembleReward

    cfg = _job_config(PPOJobConfig, args)
    output = args.output or cfg.output_dir
    reward = EnsembleReward.from_folder(cfg.reward_ensemble, cfg.ppo.aggregation, batch_size=cfg.reward_batch_size)
    judge = EnsembleReward.from_folder(cfg.judge_ensemble, batch_size=cfg.reward_batch_size) \
        if cfg.judge_ensemble else None
    trainer = PPOTrainer(cfg.ppo, load_prompts(cfg.prompts), reward, output, judge_fn=judge,
                         reward_folder=cfg.reward_ensemble)
    result = trainer.train(resume=not args.restart)
    last = result.history[-1] if result.history else {}
    print(json.dumps({"output": str(Path(output).resolve()), "steps": len(result.history),
                      "reward": last.get("reward"), "kl": last.get("kl"),
                      "wall_time_s": round(result.wall_time, 1)}, indent=2))
    return 0


def cmd_prepare_model(args) -> int:
    from rmens.models.backbone import resolve_model

    print(resolve_model(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmens", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a reward ensemble (works under `accelerate launch`)",
                           description="Train a reward-model ensemble from a YAML config plus overrides.")
    train.add_argument("--config", help="YAML file with data/ensemble/train sections")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config field, e.g. --set ensemble.kind=lora --set ensemble.k=5")
    train.add_argument("--output", help="folder for the trained ensemble (default: output_dir of the config)")
    train.set_defaults(func=cmd_train)

    run = sub.add_parser("run", help="the main job on its built-in defaults (tiny model, synthetic pairs)")
    run.add_argument("--config", help="YAML file with data/ensemble/train sections")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    run.add_argument("--output", help="output folder")
    run.set_defaults(func=cmd_train)

    ppo = sub.add_parser("ppo", help="PPO against a saved reward ensemble (works under `accelerate launch`)",
                         description="Optimise a policy with PPO; resumes from the latest checkpoint in the output "
                                     "folder unless --restart.")
    ppo.add_argument("--config", help="YAML with ppo/prompts sections and reward_ensemble")
    ppo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    ppo.add_argument("--output", help="output folder (checkpoints, history.json, policy/)")
    ppo.add_argument("--restart", action="store_true", help="ignore existing checkpoints")
    ppo.set_defaults(func=cmd_ppo)

    prep = sub.add_parser("prepare-model", help="build or convert a model alias once (e.g. smollm2-135m)")
    prep.add_argument("name", help="smollm2-135m, tiny-random-llama, or a Hugging Face id")
    prep.set_defaults(func=cmd_prepare_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValidationError, ValueError, FileNotFoundError) as err:
        print(f"rmens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
