"""The README's promise: `ulmfit run examples/ulmfitjob.yaml` trains a useful classifier here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_embedded_example_beats_twice_the_majority_baseline(tmp_path: Path) -> None:
    workdir = tmp_path / "example"
    run = subprocess.run(
        [sys.executable, "-m", "ulmfit_operator.cli", "run", "examples/ulmfitjob.yaml",
         "--workdir", str(workdir), "--nproc", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=2600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "test accuracy" in run.stdout

    result = json.loads((workdir / "result.json").read_text())
    # MiniLM is the pretrained LM: LM fine-tuning, the classifier, its evaluation.
    assert [s["name"] for s in result["stages"]] == ["finetune", "classifier", "evaluate"]
    assert all(s["state"] == "succeeded" and s["durationSeconds"] > 0 for s in result["stages"])
    accuracy, baseline = result["test"]["accuracy"], result["majorityBaseline"]
    assert 0 < baseline < 0.5
    assert accuracy >= 2 * baseline, (accuracy, baseline)
    assert set(result["report"]["perClass"]) == set(result["report"]["labels"])

    # The exported model is plain transformers.
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(result["model"].removeprefix("file://"))
    model = AutoModel.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert set(model.config.id2label.values()) == set(result["report"]["labels"])
    encoded = tokenizer(["a text editor for programmers"], return_tensors="pt")
    assert model(**encoded).last_hidden_state.shape[-1] == model.config.hidden_size
