"""Datasets: reading the splits, seeded caps, LM blocks, classifier inputs and per-rank order.

Everything here is a deterministic function of (data, seed, rank, world size): every rank
computes the same sample and the same permutation, and a resumed run finds batch ``b`` of epoch
``e`` exactly where the killed run had it, so skipping finished batches costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from ulmfit_trainer.config import DataSpec, S3Settings
from ulmfit_trainer.errors import InvalidSpec, PermanentError
from ulmfit_trainer.preflight import (  # the torch-free reading, shared with the preflight check
    dataset_dir,
    dataset_labels,
    is_multi_label,
    read_jsonl,
    read_splits,
    seeded_sample,
)

__all__ = [  # `dataset_dir`, `read_jsonl` and `seeded_sample` are re-exported for the stages
    "Encoded", "ShardedOrder", "TextDataset", "dataset_dir", "encode_classification",
    "encode_targets", "eval_shard", "lm_blocks", "lm_texts", "load_dataset", "pad_batch",
    "read_jsonl", "seeded_sample",
]  # fmt: skip


@dataclass
class TextDataset:
    """The splits of one dataset (already capped) and its label set."""

    splits: dict[str, list[dict]]
    text_field: str
    label_field: str
    labels: list[str] = field(default_factory=list)
    multi_label: bool = False

    def has(self, split: str) -> bool:
        return bool(self.splits.get(split))

    def texts(self, split: str) -> list[str]:
        return [str(row[self.text_field]) for row in self.splits.get(split, [])]

    def targets(self, split: str) -> list[str | list[str]]:
        rows = self.splits.get(split, [])
        try:
            return [row[self.label_field] for row in rows]
        except KeyError:
            raise PermanentError(
                f"split {split!r} has a row without label field {self.label_field!r}"
            ) from None

    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


def load_dataset(
    spec: DataSpec, s3: S3Settings | None, seed: int, workdir: str | Path
) -> TextDataset:
    """The dataset's splits (each capped by its seeded sample) and label set; the rows are
    those `ulmfit_trainer.preflight` checks."""
    directory = dataset_dir(spec.dataset, s3, workdir)
    splits = read_splits(spec, directory, seed)
    for split, rows in splits.items():
        if rows and spec.text_field not in rows[0]:
            raise InvalidSpec([("data.textField", spec.text_field, f"not a key of {split} rows")])
    labels = dataset_labels(directory, splits, spec.label_field)
    multi_label = is_multi_label(splits, spec.label_field)
    return TextDataset(splits, spec.text_field, spec.label_field, labels, multi_label)


# --------------------------------------------------------------------------- LM data


def lm_texts(dataset: TextDataset, pretraining: bool) -> list[str]:
    """Pretraining reads the unlabeled corpus; fine-tuning the target task's own text (train and
    unlabeled, labels unused) - ULMFiT adapts the LM to the task's distribution."""
    if pretraining:
        return dataset.texts("unlabeled") or dataset.texts("train")
    return dataset.texts("train") + dataset.texts("unlabeled")


def lm_blocks(tokenizer, texts: Sequence[str], block_size: int) -> torch.Tensor:
    """One token stream (each text framed by <s> ... </s>) cut into ``block_size`` rows."""
    if not texts:
        return torch.empty((0, block_size), dtype=torch.long)
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64)
    rows = len(flat) // block_size
    return torch.from_numpy(flat[: rows * block_size].reshape(rows, block_size).copy())


# --------------------------------------------------------------------------- classifier data


@dataclass
class Encoded:
    """Token ids per document (cut to ``max_length``) and their targets."""

    ids: list[list[int]]
    targets: torch.Tensor
    """Class indices (N,) for one label per document, multi-hot floats (N, C) for lists."""

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def encode_targets(raw: Sequence, labels: list[str], multi_label: bool) -> torch.Tensor:
    index = {label: i for i, label in enumerate(labels)}

    def lookup(label: object) -> int:
        try:
            return index[str(label)]
        except KeyError:
            raise PermanentError(f"label {label!r} is not one of {labels}") from None

    if not multi_label:
        return torch.tensor([lookup(x) for x in raw], dtype=torch.long)
    out = torch.zeros((len(raw), len(labels)), dtype=torch.float32)
    for row, value in enumerate(raw):
        for label in value if isinstance(value, list) else [value]:
            out[row, lookup(label)] = 1.0
    return out


def encode_classification(
    tokenizer,
    texts: Sequence[str],
    targets: Sequence,
    labels: list[str],
    multi_label: bool,
    max_length: int,
) -> Encoded:
    ids = (
        tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"] if texts else []
    )
    return Encoded(ids, encode_targets(targets, labels, multi_label))


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, as long as the longest sequence in the batch."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


# --------------------------------------------------------------------------- order


class ShardedOrder:
    """Which items rank ``rank`` sees in micro batch ``index`` of ``epoch``.

    Each epoch is one permutation drawn from (seed, epoch) and dealt round-robin to the ranks;
    every rank gets the same number of full batches (the tail is dropped) so the collectives of
    a data-parallel step always line up.
    """

    def __init__(
        self, n_items: int, batch_size: int, rank: int, world: int, seed: int, shuffle: bool = True
    ):
        self.n_items, self.batch_size = n_items, batch_size
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        self.batches_per_epoch = (n_items // world) // batch_size
        if self.batches_per_epoch == 0:
            raise PermanentError(
                f"{n_items} examples cannot fill one batch of {batch_size} on each of {world} "
                "processes: lower the batch size or use more data"
            )
        self._epoch: int | None = None
        self._mine = torch.empty(0, dtype=torch.long)

    def _indices(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                perm = torch.randperm(self.n_items, generator=generator)
            else:
                perm = torch.arange(self.n_items)
            self._mine = perm[self.rank :: self.world][: self.batches_per_epoch * self.batch_size]
            self._epoch = epoch
        return self._mine

    def batch(self, epoch: int, index: int) -> torch.Tensor:
        start = index * self.batch_size
        return self._indices(epoch)[start : start + self.batch_size]

    def position(self, micro_step: int) -> tuple[int, int]:
        """(epoch, batch index) of the ``micro_step``-th micro batch since the start."""
        return divmod(micro_step, self.batches_per_epoch)


def eval_shard(n_items: int, rank: int, world: int) -> range:
    """This rank's share of an evaluation set (sizes may differ by one; results are summed)."""
    return range(rank, n_items, world)
