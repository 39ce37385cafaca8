"""Word-level augmentation: seeded, reproducible, and at the spec's rates."""

from __future__ import annotations

import random

import pytest
from ulmfit_trainer.augment import augment, delete_words, replace_words, swap_words
from ulmfit_trainer.config import AugmentationSpec

TEXTS = [
    "a daemon serving files over the network to many clients at once",
    "arcade game with puzzles levels and a soundtrack",
    "library for parsing command line options in C",
    "one",
]
TARGETS = ["net", "games", "devel", ["utils", "devel"]]


def test_same_seed_same_copies_other_seed_other_copies() -> None:
    spec = AugmentationSpec(copies=2, replace_rate=0.2, delete_rate=0.2, swap_rate=0.2)
    first = augment(TEXTS, TARGETS, spec, seed=7)
    assert first == augment(TEXTS, TARGETS, spec, seed=7)
    other = augment(TEXTS, TARGETS, spec, seed=8)
    assert other[0] != first[0]
    texts, targets = first
    assert len(texts) == 2 * len(TEXTS)
    assert targets == TARGETS + TARGETS  # each copy keeps its document's label
    assert texts[: len(TEXTS)] != TEXTS and texts[:3] != texts[4:7]  # copies differ


def test_zero_rates_copy_the_documents_unchanged() -> None:
    spec = AugmentationSpec(copies=1, replace_rate=0.0, delete_rate=0.0, swap_rate=0.0)
    assert augment(TEXTS, TARGETS, spec, seed=1) == (TEXTS, TARGETS)
    assert augment(TEXTS, TARGETS, spec.model_copy(update={"copies": 0}), seed=1) == ([], [])


def test_deletion_keeps_at_least_one_word_and_the_order() -> None:
    words = ["w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9"]
    rng = random.Random(3)
    for _ in range(50):
        kept = delete_words(words, 0.5, rng)
        assert kept == [w for w in words if w in kept]  # the survivors, in order
        assert len(kept) == 5  # exactly half of ten words
    assert delete_words(["only"], 0.5, rng) == ["only"]


def test_swap_permutes_and_replacement_draws_from_the_vocabulary() -> None:
    words = ["w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9"]
    rng = random.Random(5)
    swapped = swap_words(words, 0.3, rng)
    assert sorted(swapped) == sorted(words) and swapped != words
    vocabulary = ["alpha", "beta"]
    replaced = replace_words(words, 0.3, vocabulary, rng)
    changed = [i for i, (a, b) in enumerate(zip(words, replaced, strict=True)) if a != b]
    assert len(changed) == 3 and all(replaced[i] in vocabulary for i in changed)


def test_rates_hold_on_average_over_many_documents() -> None:
    spec = AugmentationSpec(copies=1, replace_rate=0.0, delete_rate=0.25, swap_rate=0.0)
    texts = ["a b c d e f g"] * 400  # 7 words: 1.75 deletions expected per document
    augmented, _ = augment(texts, ["x"] * 400, spec, seed=11)
    deleted = sum(7 - len(t.split()) for t in augmented) / len(augmented)
    assert deleted == pytest.approx(1.75, abs=0.15)


def test_mismatched_lengths_are_an_error() -> None:
    with pytest.raises(ValueError, match="2 texts but 1 targets"):
        augment(["a", "b"], ["x"], AugmentationSpec(), seed=0)
