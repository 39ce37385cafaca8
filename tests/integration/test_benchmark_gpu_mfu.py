"""`benchmarks/gpu_mfu.py` for real on CPU (`--tiny`: both engines, DeepSpeed ZeRO-2 bf16, a few
steps): its JSON lines are well-formed and agree with themselves, and its FLOPs arithmetic holds.

Only the shape of the output is checked here, never a speed: speed targets live in the benchmark.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.parts import require_modules

require_modules("torch", "deepspeed", "transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_mfu.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_mfu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_env() -> dict[str, str]:
    env = dict(os.environ)
    # As the trainer's own CPU tests: DeepSpeed's CPU accelerator, one thread per process.
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("RANK", None)
    return env


@pytest.mark.timeout(300)
def test_tiny_cpu_run_prints_both_engines_and_a_consistent_ratio():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--steps", "3",
         "--warmup-steps", "1"],
        env=bench_env(), capture_output=True, text=True, timeout=240, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by_name = {line["name"]: line for line in lines}
    assert sorted(by_name) == ["lm_train_mfu", "lm_train_tokens_per_second"], lines

    rate = by_name["lm_train_tokens_per_second"]
    assert rate["unit"] == "tokens/s"
    assert rate["value"] > 0 and rate["baseline"] > 0
    # The ratio comes from the unrounded figures; the printed ones are rounded to 0.1 token/s.
    assert rate["ratio"] == pytest.approx(rate["value"] / rate["baseline"], rel=1e-2, abs=2e-3)
    assert set(rate["engines"]) == {"ours", "baseline"}
    assert rate["engines"]["ours"]["engine"] == "ulmfit_trainer.engine.Engine"
    assert rate["engines"]["baseline"]["engine"].startswith("transformers.Trainer")
    for side in rate["engines"].values():
        assert side["attention"] == "sdpa"
        assert "AdamW" in side["optimizer"]
    assert (rate["device"], rate["steps"], rate["warmupSteps"]) == ("cpu", 3, 1)
    assert rate["params"] > 0

    # No peak is known for a CPU: no MFU, rather than a made-up one.
    mfu = by_name["lm_train_mfu"]
    assert (mfu["value"], mfu["baseline"], mfu["ratio"], mfu["peakTflops"]) == (None,) * 4
    assert mfu["flopsPerToken"] > 6 * rate["params"]


def test_flops_per_token_of_gpt2_124m_and_the_mfu_figures():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    bench = load_benchmark()
    with torch.device("meta"):  # the shape is all that counts: no memory, no init time
        model = GPT2LMHeadModel(GPT2Config())  # 12x768, 12 heads, 1024 positions, vocab 50257
    per_token, n = bench.flops_per_token(model, 12, 768, 1024)
    # 124,439,808 parameters, less the 1024x768 position table (a lookup, no matmul).
    assert n == 124_439_808 - 1024 * 768
    assert per_token == 6 * n + 12 * 12 * 768 * 1024

    args = argparse.Namespace(tiny=False, steps=10, warmup_steps=2, batch_size=4, seq_len=1024,
                              device="cuda")  # fmt: skip
    ours = {"seconds": 2.0, "flopsPerToken": per_token, "params": n, "attention": "sdpa",
            "optimizer": "AdamW"}  # fmt: skip
    base = {**ours, "seconds": 1.0}
    rate, mfu = bench.figures(args, ours, base, peak=989.0)
    tokens = 10 * 4 * 1024
    assert rate["value"] == pytest.approx(tokens / 2.0, abs=0.1)
    assert rate["ratio"] == 0.5
    assert mfu["value"] == pytest.approx(tokens / 2.0 * per_token / 989e12, rel=1e-3)
    assert mfu["baseline"] == pytest.approx(tokens / 1.0 * per_token / 989e12, rel=1e-3)
    assert mfu["ratio"] == 0.5
    assert bench.default_peak("cpu") is None
