"""The job's exported model in the Hugging Face ecosystem: a tiny classifier trained and
evaluated by the real stages, then loaded by `AutoModelForSequenceClassification` and run by a
text-classification `pipeline` (`trust_remote_code`) in a Python that cannot import the trainer,
giving the probabilities `ulmfit predict` gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ulmfit_trainer.config import ClassifierStageSpec, DataSpec, StageConfig

from tests.harness.parts import require_modules
from tests.integration.test_trainer_pipeline import RUN, base_config, check, run_stage, trainer_env

require_modules("torch", "deepspeed", "transformers")

TEXTS = [
    "A daemon serving files over the network.",
    "Arcade game with levels and a high score table",
    "Library for numerical analysis of large matrices",
    # Longer than the 32 tokens the model reads: the pipeline does not truncate, the model cuts
    # it as the trainer's tokenizer call does.
    " ".join(["Audio player that plays music, podcasts and streams from many sources."] * 8),
]

# Run with `python -I` from an empty directory: the repository and its trainer are not on
# sys.path, and a meta-path hook refuses the trainer even through the editable install's finder.
CONSUMER = r"""
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ulmfit_trainer", "ulmfit_operator"):
            raise ModuleNotFoundError(f"{name} must not be needed by the export")
        return None

sys.meta_path.insert(0, Refuse())
from transformers import AutoModelForSequenceClassification, pipeline
from transformers.utils import logging

logging.set_verbosity_error()
model_dir, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True)
classify = pipeline("text-classification", model=model_dir, trust_remote_code=True, top_k=None)
results = classify(texts)
print(json.dumps({
    "class": type(model).__name__,
    "module_file": sys.modules[type(model).__module__].__file__,
    "trainer_imported": any(m.split(".")[0] == "ulmfit_trainer" for m in sys.modules),
    "probabilities": [{r["label"]: r["score"] for r in rows} for rows in results],
}))
"""


# The default head, and the hierarchical one: it reads whole documents in windows, so the
# pipeline's long text takes another path through the shipped module.
HEADS = {
    "concat": {},
    "hierarchical": {"window_overlap": 8, "max_document_tokens": 256},
}


def classifier_spec(head: str) -> ClassifierStageSpec:
    return ClassifierStageSpec(
        unfreeze_phases=1, epochs_per_phase=1, final_epochs=0, learning_rate=5e-3,
        batch_size=8, discriminative_factor=1.5, head_hidden_size=16, head=head, **HEADS[head],
    )  # fmt: skip


@pytest.fixture(scope="module", params=list(HEADS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`<run>/model/` of a from-scratch classifier (no LM stage: the cheapest real export)."""
    head = request.param
    tmp = tmp_path_factory.mktemp(f"hf-export-{head}")
    store = tmp / "store"
    common = base_config(
        store,
        data=DataSpec(max_length=32, max_train_examples=96, max_unlabeled_examples=200,
                      max_eval_examples=48),
    )  # fmt: skip
    spec = classifier_spec(head)
    classifier = StageConfig(stage="classifier", classifier=spec, **common)
    check(run_stage(classifier, tmp, nproc=1))
    evaluate = StageConfig(stage="evaluate", init_from="classifier", classifier=spec, **common)
    check(run_stage(evaluate, tmp, nproc=1))
    return store / RUN / "model"


def predict_cli(model_dir: Path) -> list[dict[str, float]]:
    done = subprocess.run(
        [sys.executable, "-m", "ulmfit_trainer", "predict", str(model_dir), *TEXTS],
        capture_output=True, text=True, env=trainer_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line)["probabilities"] for line in done.stdout.splitlines()]


def consumer_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf-home"), OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_export_runs_in_a_transformers_pipeline_like_ulmfit_predict(
    exported: Path, tmp_path: Path
) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "gpt2"  # plain AutoModel still reads the bare backbone
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ulmfit.UlmfitConfig",
        "AutoModelForSequenceClassification": "modeling_ulmfit.UlmfitForSequenceClassification",
    }
    labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    head = config["ulmfit_head"]
    assert head["labels"] == labels and head["head"] in HEADS
    tokens = 256 if head["head"] == "hierarchical" else 32  # what `ulmfit predict` reads
    assert config["ulmfit_truncation"] == {"max_tokens": tokens, "suffix_tokens": 1}
    for name in ("modeling_ulmfit.py", "configuration_ulmfit.py"):
        assert "ulmfit_trainer" not in (exported / name).read_text().replace(
            "ulmfit_trainer.models", ""  # named in a docstring as what the heads mirror
        )

    expected = predict_cli(exported)

    # The consumer gets the directory alone, somewhere else, and no trainer.
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    model_dir = tmp_path / "downloaded-model"
    shutil.copytree(exported, model_dir)
    done = subprocess.run(
        [sys.executable, "-I", "-c", CONSUMER, str(model_dir), json.dumps(TEXTS)],
        cwd=consumer, env=consumer_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["class"] == "UlmfitForSequenceClassification"
    assert not got["trainer_imported"]
    assert str(tmp_path / "hf-home") in got["module_file"]  # the copy shipped with the model
    difference = max(
        abs(row[label] - want[label])
        for row, want in zip(got["probabilities"], expected, strict=True)
        for label in labels
    )
    # `ulmfit predict` prints 6 decimals; the pipeline's own numbers are not rounded.
    assert difference < 1e-5, difference
    print(f"{head['head']}: max |pipeline - ulmfit predict| = {difference:.2e}")


@pytest.mark.slow
def test_the_export_has_a_model_card(exported: Path) -> None:
    card = (exported / "README.md").read_text()
    metrics = json.loads((exported.parent / "evaluate" / "metrics.json").read_text())
    for needle in (
        "builtin://debian-packages",
        ", ".join(metrics["labels"]),
        "test examples | 48",
        "### classifier",
        "learningRate | 0.005",
        f"accuracy | {metrics['summary']['accuracy']:.4g}",
        "built from scratch",
        'pipeline("text-classification", model="PATH", trust_remote_code=True',
        "## Intended use and limits",
    ):
        assert needle in card, needle
