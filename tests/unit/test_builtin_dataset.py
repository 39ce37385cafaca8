"""The shipped ``builtin://debian-packages`` dataset: files, labels, disjoint splits, counts."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from ulmfit_trainer.datasets import builtin_dataset_dir, builtin_dataset_names

SPLITS = ("train", "valid", "test", "unlabeled")


def _rows(directory: Path, split: str) -> list[dict]:
    with gzip.open(directory / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def directory() -> Path:
    return builtin_dataset_dir("debian-packages")


@pytest.fixture(scope="module")
def data(directory: Path) -> dict[str, list[dict]]:
    return {split: _rows(directory, split) for split in SPLITS}


def test_lookup() -> None:
    assert "debian-packages" in builtin_dataset_names()
    assert builtin_dataset_dir("builtin://debian-packages") == builtin_dataset_dir(
        "debian-packages"
    )
    with pytest.raises(ValueError, match="debian-packages"):
        builtin_dataset_dir("no-such-dataset")


def test_files_and_fields(directory: Path, data: dict[str, list[dict]]) -> None:
    labels = json.loads((directory / "labels.json").read_text(encoding="utf-8"))
    assert isinstance(labels, list) and len(labels) == len(set(labels)) >= 2
    for split in ("train", "valid", "test"):
        assert data[split], split
        for row in data[split]:
            assert set(row) == {"text", "label", "package"}
            assert row["label"] in labels
            assert row["text"].strip()
        assert {row["label"] for row in data[split]} == set(labels)
    for row in data["unlabeled"]:
        assert set(row) == {"text", "package"}
    # reproducible gzip: no timestamp in the header
    for split in SPLITS:
        header = (directory / f"{split}.jsonl.gz").read_bytes()[:10]
        assert header[4:8] == b"\0\0\0\0", split


def test_splits_disjoint(data: dict[str, list[dict]]) -> None:
    texts = {split: {row["text"] for row in rows} for split, rows in data.items()}
    packages = {split: {row["package"] for row in rows} for split, rows in data.items()}
    for split in SPLITS:
        assert len(texts[split]) == len(data[split]), f"duplicate text in {split}"
    for a, b in [("train", "valid"), ("train", "test"), ("valid", "test")]:
        assert not texts[a] & texts[b], (a, b)
        assert not packages[a] & packages[b], (a, b)
    for held_out in ("valid", "test"):
        assert not texts["unlabeled"] & texts[held_out], held_out
        assert not packages["unlabeled"] & packages[held_out], held_out


def test_counts_match_readme(directory: Path, data: dict[str, list[dict]]) -> None:
    readme = (directory / "README.md").read_text(encoding="utf-8")
    for split in SPLITS:
        m = re.search(rf"^\| {split} \| (\d+) \|$", readme, re.MULTILINE)
        assert m, f"no count for {split} in README.md"
        assert int(m.group(1)) == len(data[split]), split
    labels = json.loads((directory / "labels.json").read_text(encoding="utf-8"))
    per_split = {split: Counter(row["label"] for row in data[split]) for split in SPLITS[:3]}
    for label in labels:
        m = re.search(
            rf"^\| {re.escape(label)} \| (\d+) \| (\d+) \| (\d+) \|", readme, re.MULTILINE
        )
        assert m, f"no row for label {label!r} in README.md"
        counts = tuple(int(g) for g in m.groups())
        assert counts == tuple(per_split[s][label] for s in SPLITS[:3]), label


def test_size_on_disk(directory: Path) -> None:
    total = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    assert total < 4_500_000
