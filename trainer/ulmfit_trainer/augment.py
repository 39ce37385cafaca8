"""Word-level text augmentation of the labeled set: random replacement, deletion and swap.

Pure and seeded: the copies are a function of (texts, targets, spec, seed) alone, so every rank
builds the same training set and a rerun gets the same one. Each perturbation touches a
fraction of a document's words: ``rate x words`` rounded at random (up or down, in proportion to
the remainder), so short documents are perturbed at the spec's rate on average too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ulmfit_trainer.config import AugmentationSpec


def augment(
    texts: Sequence[str], targets: Sequence[Any], spec: AugmentationSpec, seed: int
) -> tuple[list[str], list[Any]]:
    """``spec.copies`` perturbed copies of every document (only the copies), with its target.

    Replacement draws from the training vocabulary: the distinct words of ``texts``.
    """
    if len(texts) != len(targets):
        raise ValueError(f"{len(texts)} texts but {len(targets)} targets")
    vocabulary = sorted({word for text in texts for word in text.split()})
    out_texts: list[str] = []
    out_targets: list[Any] = []
    for copy in range(spec.copies):
        for index, (text, target) in enumerate(zip(texts, targets, strict=True)):
            rng = random.Random(f"{seed}:{copy}:{index}")
            out_texts.append(perturb(text.split(), spec, vocabulary, rng))
            out_targets.append(target)
    return out_texts, out_targets


def perturb(
    words: list[str], spec: AugmentationSpec, vocabulary: Sequence[str], rng: random.Random
) -> str:
    """Delete, then swap, then replace words; at least one word always stays."""
    words = delete_words(words, spec.delete_rate, rng)
    words = swap_words(words, spec.swap_rate, rng)
    words = replace_words(words, spec.replace_rate, vocabulary, rng)
    return " ".join(words)


def _how_many(rate: float, n: int, rng: random.Random) -> int:
    expected = rate * n
    whole = int(expected)
    return whole + (1 if rng.random() < expected - whole else 0)


def delete_words(words: list[str], rate: float, rng: random.Random) -> list[str]:
    count = min(_how_many(rate, len(words), rng), len(words) - 1)
    if count <= 0:
        return list(words)
    dropped = set(rng.sample(range(len(words)), count))
    return [word for i, word in enumerate(words) if i not in dropped]


def swap_words(words: list[str], rate: float, rng: random.Random) -> list[str]:
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(_how_many(rate, len(words), rng)):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def replace_words(
    words: list[str], rate: float, vocabulary: Sequence[str], rng: random.Random
) -> list[str]:
    words = list(words)
    if not vocabulary or not words:
        return words
    count = min(_how_many(rate, len(words), rng), len(words))
    for i in rng.sample(range(len(words)), count):
        words[i] = rng.choice(vocabulary)
    return words
