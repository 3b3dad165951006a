"""The library's own commands, which need neither Prefect nor MLflow (and run under `accelerate launch`):

    python -m rmens.cli train --config job.yaml [--output DIR] [--overwrite]   one reward ensemble
    python -m rmens.cli ppo --config ppo.yaml [--output DIR] [--restart]        PPO against a saved ensemble
    python -m rmens.cli calibrate FOLDER --pairs FILE.jsonl [--max-pairs N]    add member standardisation
    python -m rmens.cli prepare-model NAME                                      convert/build a model alias once
    python -m rmens.cli verify FOLDER [--fix]                                   re-hash a project's every file
    python -m rmens.cli serve FOLDER [--rule lcb1] [--host H --token-file F]     the reward over HTTP

The `rmens` command (flows/cli.py) offers these too, next to the commands that orchestrate.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from rmens.config import apply_overrides, load_yaml
from rmens.errors import EngineError, ShardedStepError
from rmens.ppo.config import PPOJobConfig
from rmens.training.config import TrainJobConfig

USER_ERRORS = (ValidationError, ValueError, FileNotFoundError, FileExistsError, EngineError, ShardedStepError)
# What the machine, not the settings, refuses: a full disk or quota, a read-only or forbidden place. Said in
# one line with the file (exit 1); any other OSError is a fault to show in full.
MACHINE_ERRNOS = {errno.ENOSPC: "free some space or choose another folder",
                  errno.EDQUOT: "free some space or choose another folder",
                  errno.EROFS: "choose a writable folder", errno.EACCES: "choose a folder you may write in"}


def error_line(err: BaseException) -> str:
    """A user error in one line: each invalid setting of a ValidationError as `dotted.field: problem`,
    any other message with its line breaks folded."""
    if isinstance(err, ValidationError):
        problems = []
        for item in err.errors(include_url=False):
            field = ".".join(str(part) for part in item["loc"])
            problem = item["msg"].removeprefix("Value error, ")
            if item["type"] not in ("value_error", "missing", "extra_forbidden"):
                problem += f" (got {item['input']!r:.60})"
            problems.append(f"{field}: {problem}" if field else problem)
        return f"invalid {err.title} settings: " + "; ".join(problems)
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def job_config(model, args) -> object:
    data = load_yaml(args.config) if args.config else {}
    return model.model_validate(apply_overrides(data, args.set or []))


def cmd_train(args) -> int:
    cfg = job_config(TrainJobConfig, args)  # first: a wrong setting is reported before torch is even imported
    from rmens.data import prepare_pairs
    from rmens.models.context import check_max_length
    from rmens.models.ensemble import check_output_folder
    from rmens.training.trainer import train_ensemble

    output = args.output or cfg.output_dir
    check_output_folder(output, args.overwrite)  # before any work: the folder may hold a user's files
    check_max_length(cfg.ensemble.backbone, cfg.ensemble.max_length)
    if (args.nodes > 1) != bool(args.rdzv):
        raise ValueError("--nodes M (more than one) and --rdzv HOST:PORT, the address the nodes' ranks meet at, "
                         "go together")
    if args.nodes > 1 and cfg.ensemble.kind == "full":
        raise ValueError("a full ensemble trains one member at a time: give each member's job a node of its own "
                         "(the pipeline's member steps), or train it on one node with --devices")
    train, val = prepare_pairs(cfg.data)
    logging.info("training %s k=%d on %d pairs (%d held out)", cfg.ensemble.kind, cfg.ensemble.k, len(train), len(val))
    if args.devices * args.nodes > 1:
        result = train_sharded_job(cfg, train, val, Path(output), args)
        if result is None:
            return 0
    else:
        result = train_ensemble(cfg.ensemble, cfg.train, train, val, output, overwrite=args.overwrite)
    keys = ("accuracy", "member_accuracy", "ece", "n_pairs", "accuracy_longer_lost", "n_longer_lost",
            "length_rule_accuracy")
    summary = {key: result.metrics[key] for key in keys if key in result.metrics}
    print(json.dumps({"output": str(Path(output).resolve()), **summary,
                      "calibration_responses": result.ensemble.standardisation.responses,
                      "wall_time_s": round(result.wall_time, 1)}, indent=2))
    return 0


def train_sharded_job(cfg, train, val, output: Path, args):
    """`rmens train --devices N [--nodes M --rdzv HOST:PORT]`: the pairs and the job beside the output folder;
    on one node the ranks run now (-> their result), on several the command for each node is printed (-> None)."""
    import shlex

    from rmens.io import write_jsonl
    from rmens.training.launcher import torchrun_command, train_on_devices, write_job

    work = output.with_name(output.name + ".launch")
    work.mkdir(parents=True, exist_ok=True)
    write_jsonl(work / "train.jsonl", (p.to_dict() for p in train))
    write_jsonl(work / "val.jsonl", (p.to_dict() for p in val))
    val_file = work / "val.jsonl" if val else None
    if args.nodes == 1:
        return train_on_devices(args.devices, cfg.ensemble, cfg.train, work / "train.jsonl", val_file, output,
                                overwrite=args.overwrite)
    job = write_job(args.devices * args.nodes, cfg.ensemble, cfg.train, work / "train.jsonl", val_file, output,
                    args.overwrite)
    print(f"wrote {job.file} ({job.launch.nproc} ranks); start this on each of the {args.nodes} nodes:")
    print(shlex.join(torchrun_command(job, args.devices, args.nodes, args.rdzv)))
    return None


def cmd_ppo(args) -> int:
    cfg = job_config(PPOJobConfig, args)  # first: a wrong setting is reported before torch is even imported
    from rmens.data.prompts import load_prompts
    from rmens.evaluation.judges import RewardModelJudge
    from rmens.ppo.trainer import PPOTrainer
    from rmens.reward import EnsembleReward

    output = args.output or cfg.output_dir
    reward = EnsembleReward.from_folder(cfg.reward_ensemble, cfg.ppo.aggregation, batch_size=cfg.reward_batch_size)
    # The gold reports on its own (raw) Bradley-Terry scale, as the pipeline's reward-model gold does.
    gold = RewardModelJudge(cfg.gold_ensemble, batch_size=cfg.reward_batch_size) if cfg.gold_ensemble else None
    trainer = PPOTrainer(cfg.ppo, load_prompts(cfg.prompts), reward, output, gold_fn=gold,
                         reward_folder=cfg.reward_ensemble)
    result = trainer.train(resume=not args.restart)
    last = result.history[-1] if result.history else {}
    print(json.dumps({"output": str(Path(output).resolve()), "steps": len(result.history),
                      "reward": last.get("reward"), "kl": last.get("kl"),
                      "wall_time_s": round(result.wall_time, 1)}, indent=2))
    return 0


def cmd_calibrate(args) -> int:
    """Compute each member's standardisation on a saved ensemble's training pairs and store it in place."""
    import torch

    from rmens.data.loaders import load_jsonl_pairs
    from rmens.models.ensemble import load_ensemble, write_standardisation
    from rmens.models.standardise import calibrate, calibration_subset, pair_responses

    pairs = calibration_subset(load_jsonl_pairs(args.pairs), args.max_pairs, args.seed)  # a bad file fails first
    ensemble, tokenizer = load_ensemble(args.folder)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.folder} holds no tokenizer/ folder; save the ensemble with its tokenizer")
    ensemble.to("cuda" if torch.cuda.is_available() else "cpu")
    if ensemble.standardisation is not None:
        logging.info("%s already holds standardisation statistics (%d responses); replacing them", args.folder,
                     ensemble.standardisation.responses)
    prompts, responses = pair_responses(pairs)
    standardisation = calibrate(ensemble, tokenizer, prompts, responses, args.batch_size)
    write_standardisation(args.folder, standardisation)
    print(json.dumps({"folder": str(Path(args.folder).resolve()), **standardisation.to_json()}, indent=2))
    return 0


def cmd_prepare_model(args) -> int:
    from rmens.models.backbone import resolve_model

    print(resolve_model(args.name))
    return 0


def config_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--config", help=f"YAML file with {what}")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config field (dotted path, YAML value), e.g. --set train.lr=2e-5")


def cmd_verify(args) -> int:
    from rmens.steps.verify import verify

    verdict = verify(args.folder, fix=args.fix)
    for folder, problems in verdict.damaged.items():
        print(f"damaged: {folder}: {'; '.join(problems)}")
    for path in verdict.stale:
        print(f"changed without a new size or mtime: {path}")
    print(f"read {verdict.files} files ({verdict.bytes / 1e6:.1f} MB): " + (
        "all intact" if verdict.intact else
        f"{len(verdict.damaged)} damaged step folders, {len(verdict.stale)} changed source files; " + (
            "fixed: the next run recomputes what depends on them" if args.fix else
            "`rmens verify --fix` makes the next run recompute what depends on them")))
    return 0 if verdict.intact or args.fix else 1


def cmd_serve(args) -> int:
    from rmens.models.config import AggregationConfig
    from rmens.serve import Limits, RewardServer, ensemble_scorer

    rule = AggregationConfig.from_name(args.rule)  # first: a wrong rule is one line before the model loads
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    if args.token_file and not token:
        raise ValueError(f"--token-file {args.token_file}: the file is empty")
    if args.model.startswith("models:/") and args.resolve_model is None:
        raise ValueError(f"{args.model}: a registered model needs MLflow; run `rmens serve` (not python -m rmens.cli)")
    folder = args.resolve_model(args.model) if args.model.startswith("models:/") else args.model
    from rmens.reward import EnsembleReward

    reward = EnsembleReward.from_folder(folder, rule, batch_size=args.batch_size)
    server = RewardServer((args.host, args.port), ensemble_scorer(reward),
                          {"model": args.model, "k": reward.k, "rule": rule.name}, token,
                          Limits(max_bytes=args.max_bytes, max_batch=args.max_batch))
    print(f"serving {args.model} (k={reward.k}, rule {rule.name}) on http://{args.host}:{server.server_port}: "
          "POST /get_reward (OpenRLHF), POST /score, GET /health; Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("rmens serve: stopped", file=sys.stderr)
        return 130
    finally:
        server.server_close()
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_library_commands(sub) -> dict[str, argparse.ArgumentParser]:
    """Register train, ppo, calibrate, verify, prepare-model and serve on an argparse subparsers object; returns
    the parsers a caller may give more defaults (serve: how to resolve a models:/ URI)."""
    train = sub.add_parser("train", help="train one reward ensemble, no orchestration (works under accelerate launch)")
    config_args(train, "data/ensemble/train sections")
    train.add_argument("--output", help="folder for the trained ensemble (default: output_dir of the config)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an output folder that is not a saved ensemble (its files are deleted)")
    train.add_argument("--devices", type=positive_int, default=1, metavar="N",
                       help="shard the model over N devices of this machine: N FSDP2 ranks under torchrun (CPU ranks "
                            "with gloo where there are no GPUs)")
    train.add_argument("--nodes", type=positive_int, default=1, metavar="M",
                       help="with --rdzv: write the job of M x N ranks and print the torchrun command to start on each "
                            "node (the output folder must be on a filesystem every node shares)")
    train.add_argument("--rdzv", metavar="HOST:PORT", help="the rendezvous of a multi-node job (one node's address)")
    train.set_defaults(func=cmd_train)

    ppo = sub.add_parser("ppo", help="PPO against a saved reward ensemble (works under accelerate launch)",
                         description="Optimise a policy with PPO; resumes from the latest checkpoint in the output "
                                     "folder unless --restart.")
    config_args(ppo, "ppo/prompts sections and reward_ensemble")
    ppo.add_argument("--output", help="output folder (checkpoints, history.json, policy/)")
    ppo.add_argument("--restart", action="store_true", help="ignore existing checkpoints")
    ppo.set_defaults(func=cmd_ppo)

    cal = sub.add_parser("calibrate", help="add member standardisation statistics to a saved ensemble, in place",
                         description="Score both responses of (a seeded subset of) the ensemble's training pairs with "
                                     "every member and store each member's mean and sd in its ensemble.json, which "
                                     "every use of the ensemble then applies before aggregating members.")
    cal.add_argument("folder", help="a saved ensemble folder (with ensemble.json and tokenizer/)")
    cal.add_argument("--pairs", required=True, help="JSONL preference pairs (prompt, chosen, rejected); use the "
                                                    "ensemble's training pairs")
    cal.add_argument("--max-pairs", type=positive_int, default=256, help="pairs drawn from the file (default 256)")
    cal.add_argument("--seed", type=int, default=0, help="seed of the drawn subset (default 0)")
    cal.add_argument("--batch-size", type=positive_int, default=16)
    cal.set_defaults(func=cmd_calibrate)

    verify = sub.add_parser(
        "verify", help="re-hash every file of a project's store and the remembered hashes of the files it read",
        description="Reuse trusts a file whose size and mtime are as recorded, and remembers the hash of each data "
                    "file, prompt file and model folder by path, size, mtime and inode; a byte changed without "
                    "changing those goes unseen. verify reads everything once and names what differs. Exit 1 "
                    "when something does.")
    verify.add_argument("folder", help="a project folder (project_dir), an experiment's --out folder, or their "
                                       "artifacts folder")
    verify.add_argument("--fix", action="store_true",
                        help="unseal each damaged step folder (the next run computes that step again) and replace "
                             "stale remembered hashes (the steps reading that file recompute)")
    verify.set_defaults(func=cmd_verify)

    prep = sub.add_parser("prepare-model", help="build or convert a model alias once (e.g. smollm2-135m)")
    prep.add_argument("name", help="smollm2-135m, tiny-random-llama, or a Hugging Face id")
    prep.set_defaults(func=cmd_prepare_model)

    serve = sub.add_parser("serve", help="serve a saved ensemble's reward over HTTP (OpenRLHF's /get_reward, JSON)",
                           description="The rule's reward of a saved ensemble for RL engines that call a remote "
                                       "reward model: POST /get_reward (OpenRLHF's --remote_rm_url protocol), POST "
                                       "/score ({prompts, responses}), GET /health. Loopback only unless a token is "
                                       "given.")
    serve.add_argument("model", help="a saved ensemble folder (`rmens` itself also takes models:/<name>@<alias>)")
    serve.add_argument("--rule", default="mean", help="mean, min, lcb<beta> or uwo<lam> (e.g. lcb1); default mean")
    serve.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; any other needs a token)")
    serve.add_argument("--port", type=int, default=5100)
    serve.add_argument("--token-file", help="a file holding the bearer token clients must send")
    serve.add_argument("--batch-size", type=positive_int, default=16, help="responses per forward pass")
    serve.add_argument("--max-batch", type=positive_int, default=256, help="most responses one request may send")
    serve.add_argument("--max-bytes", type=positive_int, default=8 * 2**20, help="largest request body, in bytes")
    serve.set_defaults(func=cmd_serve, resolve_model=None)
    return {"serve": serve}


def run_command(args) -> int:
    """Logging set up, the command run, and a user's mistake reported in one line (exit code 2)."""
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        logging.debug("the error's traceback (shown with -v):", exc_info=True)
        print(f"rmens: error: {error_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        refused = machine_refusal(err)
        if refused is None:
            raise
        logging.debug("the error's traceback (shown with -v):", exc_info=True)
        # a failed copy names its source first and the file it could not write second
        where = f": {refused.filename2 or refused.filename}" if refused.filename else ""
        print(f"rmens: error: {refused.strerror}{where} ({MACHINE_ERRNOS[refused.errno]})", file=sys.stderr)
        return 1


# SQLite says a full disk or a read-only file only in words (MLflow's and Prefect's stores are SQLite files).
SQLITE_REFUSALS = {"database or disk is full": errno.ENOSPC, "attempt to write a readonly database": errno.EROFS}


def machine_refusal(err: BaseException) -> OSError | None:
    """The full disk or read-only place behind a failure, anywhere in its chain of causes (a run that fails
    while saving also fails to record that it failed: the last error is the store's, the first one names the
    file); None when the failure is something else."""
    found, seen, pending = [], set(), [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in MACHINE_ERRNOS:
            found.append(current)
        for words, code in SQLITE_REFUSALS.items():
            if words in str(current):
                found.append(OSError(code, words))
        pending += [current.__cause__, current.__context__]
    return next((e for e in found if e.filename), found[0] if found else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rmens.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_library_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
