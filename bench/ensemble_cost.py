"""What a reward ensemble costs relative to one reward model, measured side by side in one process.

For k = 1, 3, 5 and each kind (full, linear, LoRA on the top quarter of layers, plus LoRA k=5 on the
top half and on all layers) it prints scoring time per batch, training-step time and resident
parameter memory as ratios to a single reward model (one backbone, one head). Timings interleave the
arms and keep the minimum over repeats, because timing noise on shared CPUs is about 15%.
It also times training a linear k=5 ensemble against training 5 reward models one after another
with TRL's RewardTrainer on the same pairs (TRL is the `bench` extra, not a runtime dependency).

    python bench/ensemble_cost.py            # SmolLM2-135M (converted once from the GGUF wheel)
    python bench/ensemble_cost.py --quick    # tiny random Llama, seconds

Results go to bench/out/ensemble_cost[_quick].json and .txt.
"""

from __future__ import annotations

import argparse
import functools
import gc
import platform
import sys
import time

import torch
import transformers
from results import OUT, save_results

from rmens.config import derive
from rmens.data.loaders import synthetic_pairs
from rmens.models.backbone import SMOLLM2_ALIAS, TINY_ALIAS, load_tokenizer, resolve_model
from rmens.models.config import EnsembleConfig, LoraSettings
from rmens.models.ensemble import build_ensemble, to_lora
from rmens.training.config import TrainConfig
from rmens.training.trainer import bradley_terry_loss, train_ensemble


def make_arm(backbone: str, kind: str, k: int, top: float = 0.25):
    cfg = EnsembleConfig(kind="linear" if kind == "lora" else kind, k=k, backbone=backbone,
                         lora=LoraSettings(top_layers=top))
    ensemble = build_ensemble(cfg)
    if kind == "lora":
        ensemble = to_lora(ensemble, derive(cfg, kind="lora"))
    return ensemble


def arm_specs(ks: list[int]) -> list[tuple[str, str, int, float]]:
    specs = [("single", "linear", 1, 0.25)]
    for k in ks:
        specs += [(f"full k={k}", "full", k, 0.25), (f"linear k={k}", "linear", k, 0.25),
                  (f"lora k={k} top 1/4", "lora", k, 0.25)]
    top_k = max(ks)
    specs += [(f"lora k={top_k} top 1/2", "lora", top_k, 0.5), (f"lora k={top_k} all layers", "lora", top_k, 1.0)]
    return specs


PEFT_ROUTING = "lora k=5 top 1/4, PEFT routing"  # the same ensemble scored with PEFT's per-row adapter_names


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_batch(vocab: int, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def measure_scoring(arms: dict, batch: dict, repeats: int) -> dict[str, float]:
    best = {name: float("inf") for name in arms}
    with torch.no_grad():
        for arm in arms.values():  # warm-up
            arm(**batch)
        for _ in range(repeats):
            for name, arm in arms.items():
                best[name] = min(best[name], timed(lambda arm=arm: arm(**batch)))
    return best


def train_step_fn(ensemble, batch: dict):
    params = [p for p in ensemble.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    pairs = batch["input_ids"].shape[0] // 2
    targets, weights = torch.ones(pairs), torch.ones(ensemble.k, pairs)

    def step():
        loss, _ = bradley_terry_loss(ensemble(**batch), targets, weights)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def measure_training(backbone: str, specs, batch: dict, repeats: int) -> dict[str, float]:
    """Each arm alternates with the single model (so both see the same machine state)."""
    single = make_arm(backbone, "linear", 1).train()
    single_step, _ = train_step_fn(single, batch)
    single_step()
    out = {}
    for name, kind, k, top in specs:
        arm = make_arm(backbone, kind, k, top).train()
        step, optimizer = train_step_fn(arm, batch)
        step()  # warm-up; also allocates the optimizer state
        arm_best = single_best = float("inf")
        for _ in range(repeats):
            single_best = min(single_best, timed(single_step))
            arm_best = min(arm_best, timed(step))
        out[name] = arm_best / single_best
        print(f"  train {name:<24} {arm_best:8.3f} s/step  ({out[name]:.2f}x single)", flush=True)
        del arm, step, optimizer
        gc.collect()
    return out


def trl_comparison(backbone: str, n_pairs: int, max_length: int, batch: int, k: int = 5) -> dict:
    """Wall time: one linear k=5 ensemble with rmens vs k reward models trained one after another with TRL."""
    try:
        from datasets import Dataset
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer
    except ImportError as err:
        return {"skipped": f"TRL not installed ({err}); pip install -e '.[bench]'"}
    pairs = synthetic_pairs(n_pairs, seed=5)
    path = resolve_model(backbone)
    ens_cfg = EnsembleConfig(kind="linear", k=k, backbone=backbone, max_length=max_length)
    train_cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-5, progress=False, warmup_ratio=0.0)
    rmens_time = timed(lambda: train_ensemble(ens_cfg, train_cfg, pairs))

    tokenizer = load_tokenizer(path)
    rows = [{"prompt": [{"role": "user", "content": p.prompt}], "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
    dataset = Dataset.from_list(rows)

    def one_trl_model(seed: int) -> None:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        args = RewardConfig(output_dir=str(OUT / "trl-tmp"), per_device_train_batch_size=batch, num_train_epochs=1,
                            learning_rate=1e-5, max_length=max_length, seed=seed, report_to="none",
                            save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
                            optim="adamw_torch", gradient_checkpointing=False, dataloader_pin_memory=False,
                            # TrainingArguments turn bf16 on for CPUs that report it; emulated bf16 is ~10x
                            # slower here, and rmens trains in fp32 on CPUs: compare like with like.
                            bf16=False)
        RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()

    trl_time = timed(lambda: [one_trl_model(seed) for seed in range(k)])
    return {"pairs": n_pairs, "batch": batch, "rmens_linear_k5_s": rmens_time, f"trl_{k}_models_s": trl_time,
            "ratio_rmens_over_trl": rmens_time / trl_time}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model instead of SmolLM2-135M")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    backbone = TINY_ALIAS if args.quick else SMOLLM2_ALIAS
    repeats = args.repeats or (7 if args.quick else 5)
    score_shape = (8, 64) if args.quick else (8, 128)
    train_pairs, train_len = (4, 64) if args.quick else (2, 128)
    torch.manual_seed(0)
    vocab = load_tokenizer(backbone).vocab_size
    ks = [1, 3, 5]
    specs = arm_specs(ks)
    print(f"backbone={backbone} torch threads={torch.get_num_threads()} scoring batch={score_shape} "
          f"training batch={train_pairs} pairs x {train_len} tokens, repeats={repeats}", flush=True)

    arms = {name: make_arm(backbone, kind, k, top).eval() for name, kind, k, top in specs}
    arms[PEFT_ROUTING] = functools.partial(arms["lora k=5 top 1/4"], routing="peft")
    memory = {name: (arm.func if isinstance(arm, functools.partial) else arm).parameter_bytes()
              for name, arm in arms.items()}
    scoring = measure_scoring(arms, random_batch(vocab, *score_shape), repeats)
    for name, seconds in scoring.items():
        print(f"  score {name:<34} {seconds:8.3f} s  ({seconds / scoring['single']:.2f}x single)", flush=True)
    del arms
    gc.collect()
    training = measure_training(backbone, specs[1:], random_batch(vocab, 2 * train_pairs, train_len, seed=1), repeats)
    trl = {"skipped": "--skip-trl"} if args.skip_trl else trl_comparison(
        backbone, n_pairs=32 if args.quick else 16, max_length=train_len, batch=train_pairs if not args.quick else 8)

    base_t, base_m = scoring["single"], memory["single"]
    lines = [f"{'arm':<34}{'scoring':>10}{'ratio':>8}{'train step':>12}{'memory':>10}{'ratio':>8}"]
    rows = []
    for name in [spec[0] for spec in specs] + [PEFT_ROUTING]:
        row = {"arm": name, "scoring_s": scoring[name], "scoring_ratio": scoring[name] / base_t,
               "train_step_ratio": training.get(name, 1.0 if name == "single" else None),
               "param_mib": memory[name] / 2**20,
               "memory_ratio": memory[name] / base_m}
        rows.append(row)
        train = f"{row['train_step_ratio']:>11.2f}x" if row["train_step_ratio"] is not None else f"{'-':>12}"
        lines.append(f"{name:<34}{row['scoring_s']:>9.3f}s{row['scoring_ratio']:>7.2f}x"
                     f"{train}{row['param_mib']:>8.0f}Mi{row['memory_ratio']:>7.2f}x")
    if "ratio_rmens_over_trl" in trl:
        lines.append(f"training on {trl['pairs']} pairs: rmens linear k=5 {trl['rmens_linear_k5_s']:.1f} s vs "
                     f"5 x TRL RewardTrainer {trl['trl_5_models_s']:.1f} s -> {trl['ratio_rmens_over_trl']:.2f}x")
    else:
        lines.append(f"TRL comparison skipped: {trl['skipped']}")
    by_arm = {r["arm"]: r for r in rows}
    targets = {
        "linear k=5 scoring <= 1.05x": by_arm["linear k=5"]["scoring_ratio"] <= 1.05,
        "lora k=5 top 1/4 scoring <= 2.4x": by_arm["lora k=5 top 1/4"]["scoring_ratio"] <= 2.4,
        "lora k=5 memory <= 1.10x": by_arm["lora k=5 top 1/4"]["memory_ratio"] <= 1.10,
    }
    lines += [f"target {name}: {'met' if ok else 'NOT met'}" for name, ok in targets.items()]
    stem = "ensemble_cost_quick" if args.quick else "ensemble_cost"
    result = {"backbone": backbone, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "repeats": repeats, "score_shape": score_shape,
              "train_batch": [train_pairs, train_len], "rows": rows, "trl": trl, "targets": targets,
              "python": sys.version.split()[0], "torch": torch.__version__}
    save_results(stem, result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
