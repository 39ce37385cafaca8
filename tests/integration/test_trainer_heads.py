"""The classifier heads for real: one tiny causal LM fine-tuned once on the shipped Debian data,
then the attention, hierarchical and generative heads trained on it by the classifier stage
(DeepSpeed ZeRO-2, torchrun, CPU), evaluated, and used through `ulmfit predict`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from ulmfit_trainer.config import (
    ArchitectureSpec,
    ClassifierStageSpec,
    DataSpec,
    LMStageSpec,
    ModelSpec,
    StageConfig,
)

from tests.harness.parts import require_modules
from tests.integration.test_trainer_pipeline import (
    RUN,
    base_config,
    check,
    metrics_of,
    run_stage,
    trainer_env,
)

require_modules("torch", "deepspeed", "transformers")

CONTEXT = 64
EVAL_EXAMPLES = 400
# Plain words of each Debian section, as the generative head's verbalizers.
VERBALIZERS = {
    "admin": "system",
    "devel": "development",
    "games": "game",
    "net": "network",
    "science": "analysis",
    "sound": "audio",
    "utils": "utility",
    "x11": "window",
}
ROOT = Path(__file__).resolve().parents[2]


def config(store: Path, **overrides) -> dict:
    return base_config(
        store,
        data=DataSpec(
            max_length=CONTEXT,
            max_train_examples=160,
            max_unlabeled_examples=2000,
            max_eval_examples=EVAL_EXAMPLES,
        ),
        model=ModelSpec(
            architecture=ArchitectureSpec(layers=2, hidden_size=64, heads=2, context_length=CONTEXT)
        ),
        **overrides,
    )


def classifier_spec(**fields) -> ClassifierStageSpec:
    defaults = dict(
        unfreeze_phases=2, epochs_per_phase=1, final_epochs=0, learning_rate=5e-3,
        batch_size=8, discriminative_factor=1.5, head_hidden_size=32,
    )  # fmt: skip
    return ClassifierStageSpec(**{**defaults, **fields})


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the job's tokenizer and a fine-tuned tiny causal LM (`finetune`)."""
    tmp = tmp_path_factory.mktemp("heads")
    store = tmp / "store"
    lm = LMStageSpec(epochs=1, learning_rate=3e-3, batch_size=8, checkpoint_every=1000,
                     discriminative_factor=1.0)  # fmt: skip
    check(run_stage(StageConfig(stage="finetune", lm=lm, **config(store)), tmp))
    return store


def train_head(store: Path, tmp: Path, name: str, spec: ClassifierStageSpec) -> dict:
    stage = StageConfig(stage="classifier", name=name, init_from="finetune", classifier=spec,
                        **config(store))  # fmt: skip
    done = run_stage(stage, tmp)
    check(done)
    return metrics_of(done.stdout)


def predict_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    ulmfit = [sys.executable, "-c", "from ulmfit_operator.cli import main; main()"]
    return subprocess.run(
        [*ulmfit, "predict", *args], input=stdin, capture_output=True, text=True,
        env=trainer_env(), timeout=300,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_attention_head_explains_predictions_with_tokens_of_the_document(
    lm_store: Path, tmp_path: Path
) -> None:
    import torch
    from ulmfit_trainer.data import pad_batch
    from ulmfit_trainer.models import UlmfitClassifier
    from ulmfit_trainer.tokenize import load_tokenizer

    metrics = train_head(lm_store, tmp_path, "classifier", classifier_spec(head="attention"))
    assert metrics["phases"] == 2 and 0.0 <= metrics["validMacroF1"] <= 1.0
    spec = classifier_spec(head="attention")
    evaluate = StageConfig(stage="evaluate", init_from="classifier", classifier=spec,
                           **config(lm_store))  # fmt: skip
    done = run_stage(evaluate, tmp_path, nproc=1)
    check(done)
    assert metrics_of(done.stdout)["testExamples"] == EVAL_EXAMPLES
    model_dir = lm_store / RUN / "model"

    # In process: the pooling weights are a distribution over the real tokens only.
    model = UlmfitClassifier.load(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    texts = ["A daemon serving files over the network.", "Arcade game with many levels."]
    ids = tokenizer(texts, truncation=True, max_length=CONTEXT)["input_ids"]
    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id)
    assert mask.sum(1).tolist()[0] != mask.sum(1).tolist()[1]  # one row is padded
    with torch.no_grad():
        weights = model.predict(input_ids, mask).token_weights
    assert weights is not None
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    assert torch.all(weights[mask == 0] == 0) and torch.all(weights[mask == 1] > 0)

    # `ulmfit predict`: JSON lines from arguments, a file and stdin; --explain gives real tokens.
    documents = [
        "Puzzle game where you slide colored blocks to clear the board",
        "Library for parsing network packets in C programs",
    ]
    listing = tmp_path / "texts.txt"
    listing.write_text("Command line utility that renames files\n\n")
    done = predict_cli(str(model_dir), *documents, "--file", str(listing), "--explain",
                       "--top-k", "3")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    labels = json.loads((model_dir / "classifier_head.json").read_text())["labels"]
    assert [r["text"] for r in records] == [*documents, "Command line utility that renames files"]
    for record in records:
        assert record["label"] in labels
        assert set(record["probabilities"]) == set(labels)
        assert sum(record["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        explanation = record["explanation"]
        assert len(explanation) == 3
        assert [e["weight"] for e in explanation] == sorted(
            (e["weight"] for e in explanation), reverse=True
        )
        for entry in explanation:
            assert entry["token"] and entry["token"] in record["text"], entry
    # Stdin, and the terminal view: the text with its top tokens highlighted, on stderr.
    done = subprocess.run(
        [sys.executable, "-m", "ulmfit_trainer", "predict", str(model_dir), "-", "--explain",
         "--highlight", "always"],
        input="Audio player for music\n", capture_output=True, text=True, env=trainer_env(),
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["text"] == "Audio player for music"
    assert "\x1b[" in done.stderr  # styled spans
    assert "Audio player for music" in re.sub(r"\x1b\[[0-9;]*m", "", done.stderr)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hierarchical_head_reads_every_window_of_a_long_document(
    lm_store: Path, tmp_path: Path
) -> None:
    import torch
    from ulmfit_trainer.data import load_dataset, pad_batch
    from ulmfit_trainer.models import UlmfitClassifier, window_spans
    from ulmfit_trainer.tokenize import load_tokenizer

    spec = classifier_spec(head="hierarchical", window_overlap=8, max_document_tokens=1024,
                           unfreeze_phases=1, attention_heads=2)  # fmt: skip
    metrics = train_head(lm_store, tmp_path, "classifier-hierarchical", spec)
    assert metrics["phases"] == 1 and "validAccuracy" in metrics
    final = lm_store / RUN / "classifier-hierarchical" / "final"
    model = UlmfitClassifier.load(final).eval()
    assert (model.settings.max_length, model.settings.window_overlap) == (CONTEXT, 8)
    tokenizer = load_tokenizer(lm_store / RUN / "tokenizer")

    # A real document 8x longer than the model's context: valid texts joined until it is.
    dataset = load_dataset(DataSpec(), None, 0, tmp_path)
    long_text, n_tokens = "", 0
    for text in dataset.texts("valid"):
        long_text += text + "\n"
        n_tokens = len(tokenizer(long_text)["input_ids"])
        if n_tokens >= 8 * CONTEXT:
            break
    ids = tokenizer([long_text, "Arcade game"], truncation=True, max_length=1024)["input_ids"]
    assert len(ids[0]) == n_tokens >= 8 * CONTEXT  # nothing cut
    encoded = []
    hook = model.backbone.register_forward_hook(
        lambda _m, _args, kwargs, _out: encoded.append(kwargs["attention_mask"].clone()),
        with_kwargs=True,
    )
    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.predict(input_ids, mask)
    hook.remove()
    expected = window_spans(n_tokens, CONTEXT, 8)
    assert out.windows is not None and out.windows[0] == expected
    assert len(expected) >= 8 + 1  # overlapping windows: more than 8 of them
    # Every token of the document is in some window, and every window went through the backbone.
    covered = set().union(*(range(a, b) for a, b in expected))
    assert covered == set(range(n_tokens))
    assert sum(int((m.sum(1) > 0).sum()) for m in encoded) == len(expected) + 1
    # The window attention spreads over all of the long document's windows (and only those).
    assert out.window_weights is not None
    weights = out.window_weights[0, : len(expected)]
    assert torch.all(weights > 0) and float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.all(out.window_weights[1, 1:] == 0)
    assert out.logits.shape == (2, len(model.settings.labels))
    assert torch.isfinite(out.logits).all()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_generative_head_beats_the_majority_baseline_zero_shot(
    lm_store: Path, tmp_path: Path
) -> None:
    from ulmfit_trainer.data import load_dataset

    spec = classifier_spec(head="generative", verbalizers=VERBALIZERS, learning_rate=5e-4,
                           epochs_per_phase=2)  # fmt: skip
    metrics = train_head(lm_store, tmp_path, "classifier-generative", spec)
    # The majority baseline as the evaluate stage defines it: always the train split's most
    # common label (here scored on the same validation sample).
    dataset = load_dataset(config(lm_store)["data"], None, 42, tmp_path)
    most_common = Counter(dataset.targets("train")).most_common(1)[0][0]
    valid = dataset.targets("valid")
    majority = valid.count(most_common) / len(valid)
    print(f"zero-shot {metrics['validAccuracyZeroShot']:.4f}, majority {majority:.4f}, "
          f"after training {metrics['validAccuracy']:.4f}")  # fmt: skip
    assert metrics["validAccuracyZeroShot"] > majority
    # It trains as a classifier with gradual unfreezing: the head first (still above the
    # baseline), then everything.
    assert metrics["validAccuracyPhase1"] > majority
    final = lm_store / RUN / "classifier-generative" / "final"
    history = json.loads((final / "meta.json").read_text())["meta"]["history"]
    assert [h["trainableGroups"] for h in history] == [1, 4]
    assert 0.0 < metrics["validAccuracy"] <= 1.0
    head = json.loads((final / "classifier_head.json").read_text())
    assert head["head"] == "generative" and head["verbalizers"][2] == " game"

    # Zero-shot from the bare fine-tuned LM (no head files), through `ulmfit predict`.
    lm_dir = lm_store / RUN / "finetune" / "final"
    copy = tmp_path / "lm"
    shutil.copytree(lm_dir, copy)
    done = predict_cli(str(copy), "Arcade game with levels", "--labels", "games,net",
                       "--verbalizer", "games=game", "--verbalizer", "net=network")  # fmt: skip
    assert done.returncode == 2 and "no tokenizer" in done.stderr  # not a run layout: say so
    done = predict_cli(str(copy), "Arcade game with levels", "--labels", "games,net",
                       "--verbalizer", "games=game", "--verbalizer", "net=network",
                       "--tokenizer", str(lm_store / RUN / "tokenizer"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)
    assert set(record["probabilities"]) == {"games", "net"} and record["label"] in {"games", "net"}
    done = predict_cli(str(lm_dir), "Arcade game", "--explain", "--labels", "games,net")
    assert done.returncode == 2 and "attention head" in done.stderr
