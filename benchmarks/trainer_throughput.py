#!/usr/bin/env python
"""Training throughput: our LM fine-tune stage vs a plain transformers ``Trainer``.

Both run in this one invocation on the same tiny GPT-2 (built from the same config and seed), the
same token blocks of the shipped Debian dataset (tokenized by the same job tokenizer), the same
per-process batch, step count and process count under torchrun, fp32 on CPU. Ours is
``python -m ulmfit_trainer finetune`` (DeepSpeed ZeRO-2, discriminative rates, STLR, progress
reports); the baseline is ``transformers.Trainer`` (DDP over gloo, AdamW, linear decay).

Tokens per second count every token of every optimizer step on every process, timed over the
training loop only (from the first step to the last; model building and data loading excluded on
both sides). Prints one JSON line per figure: ``{"name", "value", "unit", "baseline", "ratio"}``
with ``ratio = value / baseline``.

The defaults are the embedded example's LM shape (2x128 GPT-2, 32 sequences of 64 tokens per
process). The machine's other load moves single runs by a few percent either way.

    python benchmarks/trainer_throughput.py [--nproc 2] [--steps 60] [--batch 32] [--block 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))

RUN = "bench/throughput"


def stage_config(args: argparse.Namespace, store: Path):
    from ulmfit_trainer.config import (
        ArchitectureSpec,
        DataSpec,
        LMStageSpec,
        ModelSpec,
        StageConfig,
        TokenizerSpec,
    )

    return StageConfig(
        stage="finetune",
        run=RUN,
        store_root=str(store),
        data=DataSpec(
            max_length=args.block,
            max_unlabeled_examples=args.texts,
            max_train_examples=args.texts,
            max_eval_examples=32,
        ),
        model=ModelSpec(
            architecture=ArchitectureSpec(
                layers=args.layers,
                hidden_size=args.hidden,
                heads=args.heads,
                context_length=args.block,
            )
        ),
        tokenizer=TokenizerSpec(vocab_size=args.vocab),
        lm=LMStageSpec(
            epochs=100,
            max_steps=args.steps,
            batch_size=args.batch,
            learning_rate=1e-3,
            checkpoint_every=10**9,
        ),
        progress_interval_seconds=3600,
        seed=args.seed,
    )


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "trainer"), out.get("PYTHONPATH")) if p
    )
    out.setdefault("DS_ACCELERATOR", "cpu")
    return out


def torchrun(nproc: int, *argv: str) -> tuple[str, float]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *argv]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"{' '.join(argv[:3])} failed with exit status {done.returncode}")
    return done.stdout, wall


def tagged(stdout: str, tag: str) -> dict:
    lines = [line.split(tag, 1)[1] for line in stdout.splitlines() if tag in line]
    if not lines:
        raise SystemExit(f"no {tag.strip()} line in the output")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- the baseline worker


def baseline_worker(config_path: str) -> None:
    """Runs under torchrun: the same model and blocks through ``transformers.Trainer``."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging
    from ulmfit_trainer.config import StageConfig
    from ulmfit_trainer.data import lm_blocks, lm_texts, load_dataset
    from ulmfit_trainer.models import build_lm
    from ulmfit_trainer.tokenize import load_tokenizer, special_ids

    hf_logging.set_verbosity_error()
    config = StageConfig.read(config_path)
    assert config.lm is not None
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    tokenizer = load_tokenizer(Path(config.store_root) / RUN / "tokenizer")
    dataset = load_dataset(config.data, None, config.seed, work)
    blocks = lm_blocks(tokenizer, lm_texts(dataset, pretraining=False), config.data.max_length)
    torch.manual_seed(config.seed)
    model = build_lm(config.model.family, config.model.architecture, len(tokenizer),
                     special_ids(tokenizer))  # fmt: skip

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": blocks[i], "labels": blocks[i]}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.started
            self.steps = state.global_step

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(work / "out"),
        per_device_train_batch_size=config.lm.batch_size,
        max_steps=config.lm.max_steps,
        learning_rate=config.lm.learning_rate,
        weight_decay=config.lm.weight_decay,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        warmup_steps=max(1, int(config.lm.max_steps * 0.1)),
        optim="adamw_torch",
        use_cpu=True,
        ddp_backend="gloo",
        dataloader_drop_last=True,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=config.seed,
    )
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[clock]).train()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) == 0:
        tokens = clock.steps * config.lm.batch_size * config.data.max_length * world
        print("@baseline " + json.dumps({"tokensPerSecond": tokens / clock.seconds,
                                          "steps": clock.steps}), flush=True)  # fmt: skip


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32, help="sequences per process per step")
    parser.add_argument("--block", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--texts", type=int, default=3000, help="texts per split to tokenize")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--baseline-worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        baseline_worker(args.baseline_worker)
        return

    with tempfile.TemporaryDirectory(prefix="ulmfit-bench-") as tmp:
        config = stage_config(args, Path(tmp) / "store")
        path = Path(tmp) / "finetune.json"
        config.write(path)
        ours_out, ours_wall = torchrun(args.nproc, "-m", "ulmfit_trainer", "finetune",
                                       "--config", str(path))  # fmt: skip
        ours = tagged(ours_out, "@metrics ")
        base_out, base_wall = torchrun(args.nproc, str(Path(__file__).resolve()),
                                       "--baseline-worker", str(path))  # fmt: skip
        base = tagged(base_out, "@baseline ")
    assert base["steps"] == args.steps == int(ours["steps"]), (base, ours)

    shape = f"{args.layers}x{args.hidden} GPT-2, {args.nproc} procs, {args.batch}x{args.block}"
    value, baseline = ours["tokensPerSecond"], base["tokensPerSecond"]
    print(json.dumps({
        "name": "lm_finetune_tokens_per_second", "value": round(value, 1), "unit": "tokens/s",
        "baseline": round(baseline, 1), "ratio": round(value / baseline, 3),
        "setup": shape, "steps": args.steps,
        "processSeconds": {"ours": round(ours_wall, 1), "baseline": round(base_wall, 1)},
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
