#!/usr/bin/env python
"""GPU efficiency of our LM fine-tuning engine: tokens/s and MFU against ``transformers.Trainer``.

Both sides train the same GPT-2-124M-shaped causal LM (12 layers, 768 wide, 12 heads, 1024
positions, vocabulary 50257; random weights from the same seed) in bf16 on one device, on the same
synthetic token stream (uniform random ids: throughput does not depend on what the tokens say),
with the same micro batch, sequence length, AdamW settings (betas 0.9/0.99, eps 1e-6, weight
decay 0.01), gradient clipping 1.0 and DeepSpeed ZeRO stage (2, our default).

- Ours: the LM fine-tuning stage's own pieces driven directly (``stages/lm.py`` minus the
  tokenizer, dataset and store): ``models.build_lm``, ``models.layer_groups`` with discriminative
  rates, ``engine.Engine`` (DeepSpeed, STLR), ``data.ShardedOrder``, ``stages.lm.Batches`` and the
  stage's loop body (forward, backward, step, ``loss.item()``, ``Progress.update``).
- Baseline: a plain ``transformers.Trainer`` with a DeepSpeed config (bf16, ZeRO-2), SDPA
  attention and the Trainer's default optimizer (fused AdamW on current torch), linear decay.

Each side runs in its own process (one after the other, so neither inherits the other's CUDA
allocator state or DeepSpeed globals). The first ``--warmup-steps`` optimizer steps (CUDA
context, kernel selection, allocator growth) are excluded; the clock covers the remaining
``--steps``, with a device synchronisation at both ends.

Prints one JSON line per figure, ``{"name", "value", "unit", "baseline", "ratio", ...}`` with
``value`` ours, ``baseline`` the Trainer's and ``ratio = value / baseline``:
``lm_train_tokens_per_second`` and ``lm_train_mfu`` (model FLOPs utilisation: achieved model
FLOPs / the device's peak bf16 dense FLOPs; null, with a null ratio, when the peak is unknown:
on CPU unless ``--peak-tflops`` is given). ``--tiny`` shrinks the model and the run to something
a CPU finishes in seconds: that checks the plumbing, its figures say nothing about a GPU.

    python benchmarks/gpu_mfu.py [--device cuda] [--steps 30] [--warmup-steps 5]
                                 [--batch-size 16] [--seq-len 1024] [--peak-tflops 989]
    python benchmarks/gpu_mfu.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))

TAG = "@gpu_mfu "
SEED = 42
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
# Peak dense bf16 tensor-core throughput (no sparsity), from the vendors' datasheets: H100 SXM
# 989 TFLOPS; H200 is the same GH100 compute with more and faster memory; A100 312.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


# --------------------------------------------------------------------------- shapes and FLOPs


def shape_of(args: argparse.Namespace) -> dict[str, int]:
    if args.tiny:
        return {"layers": 2, "hidden": 64, "heads": 2, "positions": 64, "vocab": 1000}
    return {"layers": 12, "hidden": 768, "heads": 12, "positions": 1024, "vocab": 50257}


def flops_per_token(model: Any, layers: int, hidden: int, seq_len: int) -> tuple[float, int]:
    """Training FLOPs per token (forward + backward) and the parameter count N it uses.

    The PaLM paper's (appendix B) and nanoGPT's estimate: each weight costs a multiply-add (2
    FLOPs) per token forward and twice that backward, so 6*N; attention's two T x T products
    (scores and the weighted sum of values) are not weights and add 2*2*T*d per layer forward,
    12*L*d*T forward + backward. N leaves out the position embeddings (a lookup, no matmul) but
    keeps the token embedding: GPT-2 ties it to the LM head, whose matmul is real work. Dropout,
    norms, softmax and the optimizer are ignored, as MFU conventionally does (and recomputation,
    had there been any, would not count: MFU is the model's FLOPs, not the hardware's).
    """
    unique = {id(p): p for p in model.parameters()}.values()
    n = sum(p.numel() for p in unique)
    n -= model.transformer.wpe.weight.numel()  # GPT-2's position table
    return 6.0 * n + 12.0 * layers * hidden * seq_len, n


def default_peak(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


# --------------------------------------------------------------------------- the workers


def describe_optimizer(optimizer: Any) -> str:
    """The wrappers down to torch's optimizer and its kernel choice, e.g.
    ``DeepSpeedZeroOptimizer > AdamW(fused=None, foreach=None)``: None means torch's default
    (foreach on CUDA, the per-tensor loop on CPU), not fused."""
    chain = []
    # Accelerate's and DeepSpeed's wrappers each keep the one they wrap as `.optimizer`.
    while hasattr(optimizer, "optimizer"):
        chain.append(type(optimizer).__name__)
        optimizer = optimizer.optimizer
    d = getattr(optimizer, "defaults", {})
    chain.append(f"{type(optimizer).__name__}(fused={d.get('fused')}, "
                 f"foreach={d.get('foreach')})")  # fmt: skip
    return " > ".join(chain)


def synthetic_blocks(args: argparse.Namespace, vocab: int):
    """The same token rows on both sides: enough for every step without reusing a batch."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    rows = (args.warmup_steps + args.steps) * args.batch_size
    return torch.randint(0, vocab, (rows, args.seq_len), generator=generator)


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def worker_ours(args: argparse.Namespace) -> dict[str, Any]:
    """The LM stage's loop over our Engine, as ``stages/lm.py`` runs it."""
    from ulmfit_trainer.config import ArchitectureSpec, DeepSpeedSpec, ModelFamily, Precision
    from ulmfit_trainer.data import ShardedOrder
    from ulmfit_trainer.engine import Engine, Progress, init_distributed, seed_everything
    from ulmfit_trainer.models import build_lm, layer_groups
    from ulmfit_trainer.schedules import discriminative_lrs
    from ulmfit_trainer.stages.lm import Batches
    from ulmfit_trainer.store import CheckpointStore, open_store

    s = shape_of(args)
    dist = init_distributed()
    seed_everything(SEED)
    architecture = ArchitectureSpec(layers=s["layers"], hidden_size=s["hidden"], heads=s["heads"],
                                    context_length=s["positions"])  # fmt: skip
    model = build_lm(ModelFamily.CAUSAL, architecture, s["vocab"], {})
    per_token, n_params = flops_per_token(model, s["layers"], s["hidden"], args.seq_len)
    groups = layer_groups(model)
    total = args.warmup_steps + args.steps
    engine = Engine(
        model, groups, discriminative_lrs(LEARNING_RATE, len(groups)), total,
        dist=dist, spec=DeepSpeedSpec(zero_stage=2, precision=Precision.BF16),
        micro_batch=args.batch_size, accumulation=1,
        cut_frac=0.1, lr_ratio=32.0, weight_decay=WEIGHT_DECAY,
    )  # fmt: skip
    blocks = synthetic_blocks(args, s["vocab"])
    order = ShardedOrder(len(blocks), args.batch_size, dist.rank, dist.world, SEED)
    batches = Batches(model, None, 0.15, SEED, dist)
    with tempfile.TemporaryDirectory(prefix="gpu-mfu-") as tmp:
        # The stage reports progress from inside its loop; an hour's interval keeps the store out
        # of the timing while the per-step bookkeeping stays in.
        progress = Progress(CheckpointStore(open_store(tmp), "bench/mfu"), "finetune", dist, 3600)
        progress.begin(total)
        engine.train()
        started = 0.0
        for step in range(total):
            if step == args.warmup_steps:
                synchronize(args.device)
                started = time.perf_counter()
            epoch, index = order.position(step)
            inputs = batches(blocks[order.batch(epoch, index)], step)
            loss = engine(**inputs).loss
            engine.backward(loss)
            engine.step()
            last = loss.item()  # the stage keeps a running mean of recent losses
            progress.update(step + 1, last, inputs["input_ids"].numel())
        synchronize(args.device)
        seconds = time.perf_counter() - started
    engine.close()
    return {
        "seconds": seconds,
        "flopsPerToken": per_token,
        "params": n_params,
        "attention": getattr(model.config, "_attn_implementation", None),
        "optimizer": describe_optimizer(engine.optimizer),
        "loss": last,
    }


def worker_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """A plain ``transformers.Trainer`` with DeepSpeed, set up as its documentation suggests."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    s = shape_of(args)
    warmup, total, device = args.warmup_steps, args.warmup_steps + args.steps, args.device
    torch.manual_seed(SEED)
    # No special tokens, as ours (random ids need none); SDPA, transformers' default, said aloud.
    config = GPT2Config(vocab_size=s["vocab"], n_positions=s["positions"], n_embd=s["hidden"],
                        n_layer=s["layers"], n_head=s["heads"], bos_token_id=None,
                        eos_token_id=None)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    per_token, n_params = flops_per_token(model, s["layers"], s["hidden"], args.seq_len)
    blocks = synthetic_blocks(args, s["vocab"])

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": blocks[i], "labels": blocks[i]}

    class Clock(TrainerCallback):
        started = 0.0
        seconds = 0.0
        steps = 0

        # Both ends at a step's end, as on our side: the Trainer's wind-down after the last
        # step (metrics, memory tracking) is not training throughput.
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                synchronize(device)
                self.started = time.perf_counter()
            elif state.global_step == total:
                synchronize(device)
                self.seconds = time.perf_counter() - self.started
            self.steps = state.global_step

    # "auto" lets the Trainer fill these from its own arguments, as its DeepSpeed docs show.
    deepspeed = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": "auto"},
        "steps_per_print": 2**62,
    }
    work = tempfile.TemporaryDirectory(prefix="gpu-mfu-hf-")  # nothing is saved there
    training = TrainingArguments(
        output_dir=work.name,
        per_device_train_batch_size=args.batch_size,
        max_steps=total,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_epsilon=1e-6,
        max_grad_norm=1.0,
        lr_scheduler_type="linear",
        warmup_steps=max(1, total // 10),  # our STLR cut_frac
        bf16=True,
        deepspeed=deepspeed,
        use_cpu=args.device == "cpu",
        dataloader_drop_last=True,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
    )
    clock = Clock()
    trainer = Trainer(model=model, args=training, train_dataset=Rows(), callbacks=[clock])
    trainer.train()
    work.cleanup()
    if clock.steps != total:
        raise SystemExit(f"the Trainer ran {clock.steps} steps, not {total}")
    return {
        "seconds": clock.seconds,
        "flopsPerToken": per_token,
        "params": n_params,
        "attention": model.config._attn_implementation,
        "optimizer": describe_optimizer(trainer.optimizer),
    }


# --------------------------------------------------------------------------- main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_worker(which: str, argv: list[str], device: str) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "trainer"), env.get("PYTHONPATH")) if p
    )
    # A job of one process, as torchrun would describe it: both sides then start DeepSpeed's
    # process group the same way.
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))  # fmt: skip
    if device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", which]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line.split(TAG, 1)[1] for line in done.stdout.splitlines() if TAG in line]
    if done.returncode or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"the {which} worker failed with exit status {done.returncode}")
    return json.loads(lines[-1])


def figure(name: str, unit: str, ours: float | None, base: float | None, **extra) -> dict:
    def rounded(x: float | None) -> float | None:
        if x is None:
            return None
        # A tenth of a token per second; MFU (a fraction, tiny on CPU) to four significant digits.
        return round(x, 1) if unit == "tokens/s" else float(f"{x:.4g}")

    ratio = round(ours / base, 3) if ours is not None and base else None
    return {"name": name, "value": rounded(ours), "unit": unit, "baseline": rounded(base),
            "ratio": ratio, **extra}  # fmt: skip


def figures(
    args: argparse.Namespace, ours: dict[str, Any], base: dict[str, Any], peak: float | None
) -> list[dict[str, Any]]:
    """The JSON lines from both workers' results; MFU only when the peak is known."""
    tokens = args.steps * args.batch_size * args.seq_len
    sides = {"ours": ours, "baseline": base}
    rate = {side: tokens / r["seconds"] for side, r in sides.items()}
    mfu: dict[str, float | None] = {
        side: (rate[side] * r["flopsPerToken"] / (peak * 1e12) if peak else None)
        for side, r in sides.items()
    }
    s = shape_of(args)
    setup = {
        "model": f"GPT-2 {s['layers']}x{s['hidden']}, {s['heads']} heads, vocab {s['vocab']}",
        "params": ours["params"],
        "device": args.device,
        "batch": args.batch_size,
        "seqLen": args.seq_len,
        "steps": args.steps,
        "warmupSteps": args.warmup_steps,
        "precision": "bf16",
        "zeroStage": 2,
        "engines": {
            "ours": {"engine": "ulmfit_trainer.engine.Engine",
                     "attention": ours["attention"], "optimizer": ours["optimizer"]},
            "baseline": {"engine": "transformers.Trainer+DeepSpeed",
                         "attention": base["attention"], "optimizer": base["optimizer"]},
        },
    }  # fmt: skip
    return [
        figure("lm_train_tokens_per_second", "tokens/s", rate["ours"], rate["baseline"], **setup),
        figure("lm_train_mfu", "fraction of peak", mfu["ours"], mfu["baseline"],
               peakTflops=peak, flopsPerToken=ours["flopsPerToken"], device=args.device),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="a 2x64 model, 2+6 steps of 4x32 tokens (for CPU)"
    )
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default 30; tiny 6)")
    parser.add_argument("--warmup-steps", type=int, help="untimed first steps (default 5; tiny 2)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 16; tiny 4)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 1024; tiny 32)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak bf16 dense TFLOPS (default: H100/H200 989, "
                             "A100 312; none on CPU, so no MFU)")  # fmt: skip
    parser.add_argument("--worker", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiny = {"steps": 6, "warmup_steps": 2, "batch_size": 4, "seq_len": 32}
    full = {"steps": 30, "warmup_steps": 5, "batch_size": 16, "seq_len": 1024}
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.seq_len > shape_of(args)["positions"]:
        parser.error(f"--seq-len exceeds the model's {shape_of(args)['positions']} positions")
    if args.steps < 1 or args.warmup_steps < 1:
        # The clock starts at the end of a warm-up step on both sides.
        parser.error("--steps and --warmup-steps must be at least 1")

    if args.worker:
        result = (worker_ours if args.worker == "ours" else worker_baseline)(args)
        print(TAG + json.dumps(result), flush=True)
        return

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but no CUDA device is visible (use --device cpu)")
    argv = [f"--device={args.device}", f"--steps={args.steps}",
            f"--warmup-steps={args.warmup_steps}", f"--batch-size={args.batch_size}",
            f"--seq-len={args.seq_len}", *(["--tiny"] if args.tiny else [])]  # fmt: skip
    ours = run_worker("ours", argv, args.device)
    base = run_worker("baseline", argv, args.device)

    peak = args.peak_tflops if args.peak_tflops is not None else default_peak(args.device)
    for line in figures(args, ours, base, peak):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
