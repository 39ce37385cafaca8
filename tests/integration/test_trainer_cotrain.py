"""Co-training for real: two tiny classifiers (2 processes each under torchrun, DeepSpeed ZeRO-2
on CPU) learn from 50 gold labels plus the keyword rules of examples/ulmfitjob-cotrain.yaml, vote
on the pool, and their confident, balanced agreement yields pseudo-labels that are more often
right than the rules overall (held-out gold of the unused train documents scores both). The
agreement mostly selects documents the rules also get right: it filters, it does not out-learn them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ulmfit_trainer.config import (
    ArchitectureSpec,
    ClassifierStageSpec,
    CotrainSpec,
    DataSpec,
    ModelSpec,
    StageConfig,
    TokenizerSpec,
)
from ulmfit_trainer.store import CheckpointStore, open_store

from tests.harness.parts import require_modules
from tests.integration.test_trainer_pipeline import check, metrics_of, run_stage

require_modules("torch", "deepspeed", "transformers")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ulmfitjob-cotrain.yaml"
RUN = "testing/cotrain"


def example_cotrain() -> CotrainSpec:
    job = yaml.safe_load(EXAMPLE.read_text())
    return CotrainSpec.model_validate(job["spec"]["stages"]["cotrain"])


def stage_config(store: Path, cotrain_update: dict | None = None, **fields) -> StageConfig:
    cotrain_update = cotrain_update or {}
    # From scratch (no LM stage, to stay fast): every layer trains from the first step.
    classifier = ClassifierStageSpec(
        unfreeze_phases=1, epochs_per_phase=1, final_epochs=14, learning_rate=1e-2,
        batch_size=8, discriminative_factor=1.0, head_hidden_size=32,
    )  # fmt: skip
    cotrain = example_cotrain().model_copy(
        update={"classifier": None, "max_pool_examples": 600, "min_confidence": 0.5,
                **cotrain_update}
    )  # fmt: skip
    return StageConfig(
        run=RUN,
        store_root=str(store),
        data=DataSpec(
            max_length=32, max_train_examples=50, max_unlabeled_examples=200, max_eval_examples=160
        ),
        model=ModelSpec(
            architecture=ArchitectureSpec(layers=2, hidden_size=32, heads=2, context_length=32)
        ),
        tokenizer=TokenizerSpec(vocab_size=600),
        classifier=classifier,
        cotrain=cotrain,
        progress_interval_seconds=1.0,
        **fields,
    )


def read_votes(store: Path, key: str) -> list[dict]:
    path = store / RUN / key / "final" / "votes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cotrained_pseudo_labels_beat_the_rules_they_learned_from(tmp_path: Path) -> None:
    from ulmfit_trainer.data import load_dataset
    from ulmfit_trainer.engine import Dist
    from ulmfit_trainer.stages import Context
    from ulmfit_trainer.stages.cotrain import pseudo_labels

    store = tmp_path / "store"
    checkpoints = CheckpointStore(open_store(store), RUN)
    keys = ["cotrain-first", "cotrain-second"]
    stage_metrics = {}
    for name, key in zip(("first", "second"), keys, strict=True):
        config = stage_config(store, stage="cotrain", name=key, cotrain_model=name)
        done = run_stage(config, tmp_path)
        check(done)
        stage_metrics[key] = metrics_of(done.stdout)
        final = checkpoints.latest(key)  # what a runner looks at to see the stage finished
        assert final is not None and final.final and final.tag == "final"
        assert final.meta["model"] == name and final.meta["metrics"] == stage_metrics[key]

    # Both models voted on the same pool; the gold of the unused train documents stayed hidden.
    votes = {key: read_votes(store, key) for key in keys}
    pool = [json.loads(line) for line in (store / RUN / keys[0] / "final" / "pool.jsonl").open()]
    assert len(pool) == 600 and [v["id"] for v in votes[keys[0]]] == [d["id"] for d in pool]
    assert [v["id"] for v in votes[keys[1]]] == [d["id"] for d in pool]
    gold = {d["id"]: d["gold"] for d in pool if "gold" in d}
    assert len(gold) > 400 and all(d["id"].startswith("train-") for d in pool if "gold" in d)
    trained_on = set(load_dataset(config.data, None, config.seed, tmp_path).texts("train"))
    assert len(trained_on) == 50 and not trained_on & {d["text"] for d in pool}
    for key in keys:
        metrics = stage_metrics[key]
        assert metrics["poolSize"] == 600 and metrics["weakLabels"] > 150
        # The rules are noisy but informative, as the example says (measured on gold documents).
        assert 0.5 <= metrics["weakLabelAccuracy"] <= 0.85, metrics
        assert 0.0 < metrics["validAccuracy"] <= 1.0

    # Agreement of the two models (balanced 3:1 at most, as in the example): more accurate than
    # the rules they learned from, on held-out gold documents.
    dist = Dist(rank=0, world=1, local_rank=0, local_world=1, device=_cpu())

    def combined(**cotrain_update):
        config = stage_config(store, cotrain_update, stage="classifier", pseudo_labels_from=keys)
        return pseudo_labels(Context(config, dist, checkpoints, tmp_path / "work"), keys)

    texts, targets, about = combined()
    weak_metrics = {
        f"{key}/{name}": value
        for key in keys
        for name, value in stage_metrics[key].items()
        if name in ("weakLabelAccuracy", "weakLabels", "validAccuracy")
    }
    print(json.dumps({**about, **weak_metrics}))  # the figures behind the assertions
    assert len(texts) == len(targets) == about["pseudoLabels"] >= 24
    assert about["pseudoLabelPool"] == 600
    assert 0.55 <= about["weakLabelAccuracy"] <= 0.85
    assert about["pseudoLabelAccuracy"] > about["weakLabelAccuracy"] + 0.08, about
    per_class = {k.split("/", 1)[1]: v for k, v in about.items() if k.startswith("pseudoLabels/")}
    assert sum(per_class.values()) == about["pseudoLabels"] and len(per_class) == 8
    text_of = {d["text"]: d for d in pool}
    assert all(t in text_of for t in texts)  # the default view: the whole text field
    # Each accepted document: both models predicted its label with probability >= 0.5.
    by_id = {key: {v["id"]: v for v in votes[key]} for key in keys}
    for text, label in zip(texts, targets, strict=True):
        doc = text_of[text]["id"]
        assert all(by_id[k][doc]["label"] == label and by_id[k][doc]["confidence"] >= 0.5
                   for k in keys)  # fmt: skip

    # Balance and the per-class cap only ever remove pseudo-labels.
    capped, _, about_capped = combined(balance=1.5, max_per_class=10)
    assert set(capped) < set(texts)
    counts = [v for k, v in about_capped.items() if k.startswith("pseudoLabels/") and v]
    assert counts and max(counts) <= min(10, int(1.5 * min(counts)))
    assert 0 < about_capped["pseudoLabels"] < about["pseudoLabels"]

    # A crash after training but before the votes were committed: the rerun trains nothing
    # again (every phase is committed) and commits the same votes.
    final_meta = store / RUN / keys[0] / "final" / "meta.json"
    final_meta.unlink()
    rerun = stage_config(store, stage="cotrain", name=keys[0], cotrain_model="first")
    done = run_stage(rerun, tmp_path)
    check(done)
    assert "resumed at phase 2" in done.stdout
    assert read_votes(store, keys[0]) == votes[keys[0]]


def _cpu():
    import torch

    return torch.device("cpu")
