"""Trainer data path on the real parts: the tokenizers library, the shipped dataset, the scoring."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from tests.harness.parts import require_modules

require_modules("torch", "transformers")
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from ulmfit_trainer.config import DataSpec, ModelFamily  # noqa: E402
from ulmfit_trainer.data import (  # noqa: E402
    ShardedOrder,
    encode_classification,
    eval_shard,
    lm_blocks,
    lm_texts,
    load_dataset,
    pad_batch,
)
from ulmfit_trainer.stages.evaluate import expected_calibration_error, score  # noqa: E402
from ulmfit_trainer.tokenize import tokenizer_hash, train_tokenizer  # noqa: E402

pytestmark = pytest.mark.timeout(120)

TEXTS = [
    "A fast, small text editor for the terminal.",
    "Library for parsing configuration files - development files.",
    "Network daemon that serves files over HTTP and FTP.",
    "Puzzle game with falling blocks and a high-score table.",
] * 25


@pytest.mark.parametrize("family", list(ModelFamily))
def test_trained_tokenizer_round_trips_through_auto_tokenizer(
    family: ModelFamily, tmp_path: Path
) -> None:
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, lowercase=True, family=family)
    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = loaded("Ünïcode TEXT editor")["input_ids"]
    assert ids == tokenizer("Ünïcode TEXT editor")["input_ids"]
    # Every document is framed <s> ... </s>; byte-level BPE needs no unknown token.
    assert ids[0] == loaded.bos_token_id and ids[-1] == loaded.eos_token_id
    assert loaded.decode(ids, skip_special_tokens=True) == "ünïcode text editor"
    assert loaded.pad_token == "<pad>"
    assert (loaded.mask_token == "<mask>") == (family == ModelFamily.MASKED)
    digest = tokenizer_hash(tmp_path)
    assert len(digest) == 64
    again = tmp_path / "again"
    train_tokenizer(TEXTS, vocab_size=300, lowercase=True, family=family).save_pretrained(
        str(again)
    )
    assert tokenizer_hash(again) == digest  # training is deterministic


def test_lm_blocks_are_one_framed_stream() -> None:
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    blocks = lm_blocks(tokenizer, TEXTS[:8], 16)
    stream = [i for t in TEXTS[:8] for i in tokenizer(t)["input_ids"]]
    assert blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert lm_blocks(tokenizer, [], 16).shape == (0, 16)


def test_sharded_order_is_disjoint_complete_and_deterministic() -> None:
    orders = [ShardedOrder(103, 5, rank, 2, seed=7) for rank in range(2)]
    assert orders[0].batches_per_epoch == 10  # 51 per rank -> 10 full batches
    for epoch in range(2):
        seen = [
            i
            for o in orders
            for b in range(o.batches_per_epoch)
            for i in o.batch(epoch, b).tolist()
        ]
        assert len(seen) == len(set(seen)) == 100
    again = ShardedOrder(103, 5, 1, 2, seed=7)
    assert torch.equal(again.batch(1, 3), orders[1].batch(1, 3))  # a resumed run's batch
    assert not torch.equal(orders[0].batch(0, 0), orders[0].batch(1, 0))  # reshuffled per epoch
    assert orders[0].position(23) == (2, 3)
    with pytest.raises(Exception, match="cannot fill one batch"):
        ShardedOrder(5, 4, 0, 2, seed=0)
    assert sorted(i for r in range(3) for i in eval_shard(10, r, 3)) == list(range(10))


def test_builtin_dataset_caps_are_seeded_samples(tmp_path: Path) -> None:
    spec = DataSpec(max_train_examples=50, max_eval_examples=20, max_unlabeled_examples=30)
    first = load_dataset(spec, None, seed=1, workdir=tmp_path)
    again = load_dataset(spec, None, seed=1, workdir=tmp_path)
    other = load_dataset(spec, None, seed=2, workdir=tmp_path)
    assert [len(first.splits[s]) for s in ("train", "valid", "test", "unlabeled")] == [
        50,
        20,
        20,
        30,
    ]
    assert first.texts("train") == again.texts("train")
    assert first.texts("train") != other.texts("train")
    assert len(first.labels) >= 2 and not first.multi_label
    assert set(first.targets("train")) <= set(first.labels)
    # Fine-tuning reads the task's text (train + unlabeled); pretraining the unlabeled corpus.
    assert lm_texts(first, pretraining=False) == first.texts("train") + first.texts("unlabeled")
    assert lm_texts(first, pretraining=True) == first.texts("unlabeled")


def test_multi_label_dataset_from_a_directory(tmp_path: Path) -> None:
    rows = [
        {"body": "red and round", "tags": ["red", "round"]},
        {"body": "blue cube", "tags": ["blue"]},
        {"body": "a red cube", "tags": ["red"]},
    ]
    for split in ("train", "valid", "test"):
        with gzip.open(tmp_path / f"{split}.jsonl.gz", "wt") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    spec = DataSpec(dataset=str(tmp_path), text_field="body", label_field="tags")
    dataset = load_dataset(spec, None, seed=0, workdir=tmp_path / "work")
    assert dataset.multi_label and dataset.labels == ["blue", "red", "round"]
    tokenizer = train_tokenizer([r["body"] for r in rows] * 10, vocab_size=280)
    encoded = encode_classification(
        tokenizer, dataset.texts("train"), dataset.targets("train"), dataset.labels, True, 4
    )
    assert encoded.targets.tolist() == [[0, 1, 1], [1, 0, 0], [0, 1, 0]]
    assert all(len(ids) <= 4 for ids in encoded.ids)
    ids, mask = pad_batch(encoded.ids, tokenizer.pad_token_id)
    assert ids.shape == mask.shape and mask.sum().item() == encoded.tokens()


def test_score_reports_accuracy_f1_confusion_baseline_and_calibration() -> None:
    labels = ["a", "b", "c"]
    targets = torch.tensor([0, 0, 1, 2])
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    report = score(probs, targets, labels, False, ["b", "b", "a"])
    summary = report["summary"]
    assert summary["accuracy"] == 0.75
    assert report["confusionMatrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert report["perClass"]["b"] == {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1.0}
    assert math.isclose(summary["macroF1"], (2 / 3 + 2 / 3 + 1.0) / 3)
    assert report["majorityBaseline"] == {"label": "b", "accuracy": 0.25}
    # One bin per confidence here: |1 - .9| + |0 - .7| + |1 - .8| + |1 - .4|, each weighted 1/4.
    assert summary["expectedCalibrationError"] == pytest.approx((0.1 + 0.7 + 0.2 + 0.6) / 4)
    perfect = expected_calibration_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert perfect == 0.0
