"""The data against the spec, checked before any training: cheap, torch-free, in one place.

`check_stages` reads a job's dataset once (its splits as the trainer samples them, no tokenizer,
no model) and raises `InvalidSpec` listing every problem, each naming the field and the value:

- the dataset resolves (a directory, ``builtin://NAME``, ``s3://...``) and holds non-empty
  ``train``, ``valid`` and ``test`` splits (every job trains and evaluates a classifier);
- every row has ``data.textField`` (and a co-trained model's own ``textField``), every labeled
  row ``data.labelField``, and each label found is listed in ``labels.json`` when there is one;
- a co-training stage has a pool (``unlabeled`` rows, or train rows ``maxTrainExamples`` leaves
  out), one label per document, and a ``noisyLabelField`` some row carries;
- every label the spec names - a co-training rule's ``label``, a classifier's ``classWeights`` and
  ``verbalizers`` keys (``stages.classifier`` and ``stages.cotrain.classifier``) - is a label of
  the dataset.

The local runner calls it before the first stage it runs (``ulmfit run`` fails in seconds, exit
2); the trainer checks at the start of every stage (`ulmfit_trainer.stages`: a local or built-in
dataset before torch is imported, an S3 one on the rows the stage downloads anyway, with
`stage_problems`), so a job on a cluster fails the same way, as a failed progress record marked
``invalid``.

The reading primitives live here too (`dataset_dir`, `read_splits`, `dataset_labels`, ...) so
the trainer's `ulmfit_trainer.data` and this check see exactly the same rows and labels. Nothing
heavy is imported: the operator's local runner imports this module.
"""

from __future__ import annotations

import gzip
import json
import random
import tempfile
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

from ulmfit_trainer.config import (
    ClassifierStageSpec,
    CotrainModelSpec,
    DataSpec,
    S3Settings,
    StageConfig,
    StageName,
)
from ulmfit_trainer.errors import InvalidSpec, PermanentError, TemporaryError
from ulmfit_trainer.store import StoreError, fetch

SPLITS = ("train", "valid", "test", "unlabeled")
LABELED = ("train", "valid", "test")
REQUIRED = LABELED
"""Splits every job needs: the classifier trains on `train`, validates on `valid`, and the
evaluate stage scores `test`."""

Problem = tuple[str, object, str]


# --------------------------------------------------------------------------- reading


def dataset_dir(uri: str, s3: S3Settings | None, workdir: str | Path) -> Path:
    """A local directory holding the dataset at ``uri`` (downloaded when it is on S3)."""
    if uri.startswith("builtin://"):
        from ulmfit_trainer.datasets import builtin_dataset_dir

        try:
            return Path(builtin_dataset_dir(uri.removeprefix("builtin://")))
        except ValueError as exc:
            raise InvalidSpec([("data.dataset", uri, str(exc))]) from None
    if uri.startswith("s3://"):
        return fetch(uri, Path(workdir) / "dataset", s3)
    path = fetch(uri, workdir, s3)
    if not path.is_dir():
        raise InvalidSpec([("data.dataset", uri, "no such directory")])
    return path


def split_file(directory: Path, split: str) -> Path | None:
    """The file of ``split`` (``.jsonl.gz`` or ``.jsonl``) in ``directory``; None when absent."""
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (directory / name).exists():
            return directory / name
    return None


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def seeded_sample(items: list, k: int | None, seed: int, salt: str) -> list:
    """At most ``k`` items, the same ones for a given seed on every rank, in their file order."""
    if k is None or k >= len(items):
        return items
    rng = random.Random(f"{seed}:{salt}")
    return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


def split_caps(spec: DataSpec) -> dict[str, int | None]:
    return {
        "train": spec.max_train_examples,
        "valid": spec.max_eval_examples,
        "test": spec.max_eval_examples,
        "unlabeled": spec.max_unlabeled_examples,
    }


def read_splits(spec: DataSpec, directory: Path, seed: int) -> dict[str, list[dict]]:
    """The splits present in ``directory``, each capped by its seeded sample (as trained on).
    Raises `InvalidSpec` when the directory holds none, or a line is not JSON."""
    caps = split_caps(spec)
    splits: dict[str, list[dict]] = {}
    for split in SPLITS:
        path = split_file(directory, split)
        if path is None:
            continue
        try:
            rows = read_jsonl(path)
        except (ValueError, OSError, EOFError) as exc:
            raise InvalidSpec(
                [("data.dataset", spec.dataset, f"cannot read {path.name}: {exc}")]
            ) from None
        splits[split] = seeded_sample(rows, caps[split], seed, split)
    if not splits:
        raise InvalidSpec(
            [("data.dataset", spec.dataset, "holds no train/valid/test/unlabeled .jsonl(.gz)")]
        )
    return splits


def _flat(values: Iterable[object]) -> Iterable[object]:
    return chain.from_iterable(x if isinstance(x, list) else [x] for x in values)


def dataset_labels(directory: Path, splits: dict[str, list[dict]], label_field: str) -> list[str]:
    """The dataset's label set: ``labels.json`` when present, else every label of the labeled
    splits, sorted."""
    labels_file = directory / "labels.json"
    if labels_file.exists():
        return [str(label) for label in json.loads(labels_file.read_text())]
    seen = (
        row[label_field] for split in LABELED for row in splits.get(split, []) if label_field in row
    )
    return sorted({str(label) for label in _flat(seen)})


def is_multi_label(splits: dict[str, list[dict]], label_field: str) -> bool:
    return any(
        isinstance(row.get(label_field), list) for split in LABELED for row in splits.get(split, [])
    )


# --------------------------------------------------------------------------- the checks


def check_stages(configs: Sequence[StageConfig]) -> None:
    """Read the dataset of ``configs`` once per distinct data spec (an S3 one into a temporary
    directory) and check each config against it; raises `InvalidSpec` with every problem found,
    each listed once. The store's own failures (unreachable, credentials refused) pass through."""
    problems: dict[str, Problem] = {}
    groups: dict[str, list[StageConfig]] = {}
    for config in configs:
        key = json.dumps([config.data.to_wire(), config.seed], sort_keys=True)
        groups.setdefault(key, []).append(config)
    with tempfile.TemporaryDirectory(prefix="ulmfit-preflight-") as scratch:
        for group in groups.values():
            first = group[0]
            try:
                directory = dataset_dir(first.data.dataset, first.s3, scratch)
            except StoreError as exc:
                if isinstance(exc, TemporaryError | PermanentError):  # unreachable, or refused
                    raise
                raise InvalidSpec([("data.dataset", first.data.dataset, str(exc))]) from None
            splits = read_splits(first.data, directory, first.seed)
            labels = dataset_labels(directory, splits, first.data.label_field)
            for config in group:
                for problem in stage_problems(config, splits, labels):
                    problems.setdefault(repr(problem), problem)
    if problems:
        raise InvalidSpec(list(problems.values()))


def stage_problems(
    config: StageConfig, splits: dict[str, list[dict]], labels: list[str]
) -> list[Problem]:
    """What is wrong with ``config`` for this data (the splits as read, the label set)."""
    data = config.data
    problems: list[Problem] = [
        ("data.dataset", data.dataset, f"has no {split} split" if split not in splits else
         f"has an empty {split} split")
        for split in REQUIRED
        if not splits.get(split)
    ]  # fmt: skip
    problems += _missing_field("data.textField", data.text_field, splits, SPLITS)
    problems += _missing_field("data.labelField", data.label_field, splits, LABELED)
    problems += _unlisted_labels(data, splits, labels)
    known = set(labels)
    for where, spec in _classifier_specs(config):
        for name, value in (
            ("classWeights", spec.class_weights),
            ("verbalizers", spec.verbalizers),
        ):
            problems += [
                (f"{where}.{name}", label, f"is not a label of the dataset (labels: {labels})")
                for label in value
                if label not in known
            ]
    if config.cotrain is not None:
        for i, model in enumerate(config.cotrain.models):
            where = f"stages.cotrain.models[{i}]"
            problems += [
                (f"{where}.rules[{j}].label", rule.label,
                 f"is not a label of the dataset (labels: {labels})")
                for j, rule in enumerate(model.rules)
                if rule.label not in known
            ]  # fmt: skip
            if config.stage == StageName.COTRAIN and model.name == config.cotrain_model:
                problems += _cotrain_problems(config, where, model, splits)
    return problems


def _classifier_specs(config: StageConfig) -> list[tuple[str, ClassifierStageSpec]]:
    specs = []
    if config.classifier is not None:
        specs.append(("stages.classifier", config.classifier))
    if config.cotrain is not None and config.cotrain.classifier is not None:
        specs.append(("stages.cotrain.classifier", config.cotrain.classifier))
    return specs


def _missing_field(
    field: str, name: str, splits: dict[str, list[dict]], which: Sequence[str]
) -> list[Problem]:
    for split in which:
        for number, row in enumerate(splits.get(split, []), 1):
            if not isinstance(row, dict) or name not in row:
                return [(field, name, f"missing from row {number} of the {split} split")]
    return []


def _unlisted_labels(
    data: DataSpec, splits: dict[str, list[dict]], labels: list[str]
) -> list[Problem]:
    known = set(labels)
    for split in LABELED:
        rows = splits.get(split, [])
        values = (row.get(data.label_field) for row in rows if isinstance(row, dict))
        for value in _flat(values):
            if value is not None and str(value) not in known:
                return [(
                    "data.labelField", data.label_field,
                    f"the {split} split has label {str(value)!r}, which labels.json does not "
                    f"list (labels: {labels})",
                )]  # fmt: skip
    return []


def _cotrain_problems(
    config: StageConfig, where: str, model: CotrainModelSpec, splits: dict[str, list[dict]]
) -> list[Problem]:
    problems: list[Problem] = []
    data = config.data
    if is_multi_label(splits, data.label_field):
        problems.append(
            ("stages.cotrain", data.label_field,
             "co-training needs one label per document; the dataset's labels are lists")
        )  # fmt: skip
    train_left = data.max_train_examples is not None and len(splits.get("train", [])) >= (
        data.max_train_examples
    )
    if not splits.get("unlabeled") and not train_left:
        problems.append(
            ("data.dataset", data.dataset,
             "co-training needs a pool: no unlabeled rows, and data.maxTrainExamples leaves no "
             "train row unused")
        )  # fmt: skip
    if model.text_field:
        problems += _missing_field(
            f"{where}.textField", model.text_field, splits, ("train", "unlabeled")
        )
    if model.noisy_label_field:
        pool = chain(splits.get("unlabeled", []), splits.get("train", []))
        if not any(model.noisy_label_field in row for row in pool if isinstance(row, dict)):
            problems.append(
                (f"{where}.noisyLabelField", model.noisy_label_field,
                 "no unlabeled or train row has this field")
            )  # fmt: skip
    return problems
