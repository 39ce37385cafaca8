"""`ulmfit_trainer.preflight`: the data checked against a stage's config, torch-free and cheap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ulmfit_trainer.config import StageConfig
from ulmfit_trainer.errors import InvalidSpec
from ulmfit_trainer.preflight import check_stages
from ulmfit_trainer.records import StageProgress, parse_progress_line

ROWS = {
    "train": [{"text": f"doc {i}", "label": "pos" if i % 2 else "neg"} for i in range(8)],
    "valid": [{"text": "v", "label": "pos"}, {"text": "w", "label": "neg"}],
    "test": [{"text": "t", "label": "neg"}],
    "unlabeled": [{"text": "u", "noisy": "pos"}, {"text": "x"}],
}


def write_dataset(directory: Path, **splits: list[dict] | None) -> Path:
    """The splits of ROWS, with each keyword replacing one (None leaves the split out)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in {**ROWS, **splits}.items():
        if rows is not None:
            lines = "".join(json.dumps(row) + "\n" for row in rows)
            (directory / f"{split}.jsonl").write_text(lines)
    return directory


def config(data: Path | str, stage: str = "classifier", **extra: Any) -> StageConfig:
    document: dict[str, Any] = {
        "stage": stage,
        "run": "default/job",
        "storeRoot": "/nonexistent/store",
        "data": {"dataset": str(data)},
        "classifier": {},
        **extra,
    }
    if stage in ("pretrain", "finetune"):
        document["lm"] = {}
    return StageConfig.model_validate(document)


def cotrain(*rules: dict[str, Any], **model: Any) -> dict[str, Any]:
    return {
        "cotrain": {"models": [{"name": "a", "rules": list(rules), **model}], "minAgreement": 1},
        "cotrainModel": "a",
    }


def problems(*configs: StageConfig) -> list[tuple[str, object, str]]:
    with pytest.raises(InvalidSpec) as caught:
        check_stages(list(configs))
    return caught.value.problems


def test_data_that_fits_every_stage_passes(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d")
    rule = {"label": "pos", "keywords": ["good"]}
    check_stages(
        [
            config(data, "finetune"),
            config(data, "cotrain", **cotrain(rule, noisyLabelField="noisy")),
            config(data, classifier={"classWeights": {"pos": 2.0}, "verbalizers": {"neg": "bad"}}),
            config(data, "evaluate"),
        ]
    )


def test_the_builtin_dataset_passes() -> None:
    check_stages([config("builtin://debian-packages")])


def test_a_rule_naming_an_unknown_label_is_named_with_its_field(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d")
    good, bad = {"label": "pos", "keywords": ["x"]}, {"label": "positive", "keywords": ["y"]}
    (field, value, message), *rest = problems(config(data, "cotrain", **cotrain(good, bad)))
    assert not rest
    assert (field, value) == ("stages.cotrain.models[0].rules[1].label", "positive")
    assert "not a label of the dataset" in message and "'neg', 'pos'" in message
    # Any stage that carries the cotrain settings finds it, not only the cotrain stage.
    found = problems(config(data, "classifier", **cotrain(bad)))
    assert [p[:2] for p in found] == [("stages.cotrain.models[0].rules[0].label", "positive")]


def test_class_weights_and_verbalizers_must_name_labels(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d")
    extra = cotrain({"label": "pos", "keywords": ["x"]})
    extra["cotrain"]["classifier"] = {"classWeights": {"Neg": 3.0}}
    found = problems(
        config(data, classifier={"classWeights": {"pos": 1.0, "maybe": 2.0}}),
        config(data, classifier={"verbalizers": {"neutral": "meh"}}),
        config(data, "cotrain", **extra),
    )
    assert [p[:2] for p in found] == [
        ("stages.classifier.classWeights", "maybe"),
        ("stages.classifier.verbalizers", "neutral"),
        ("stages.cotrain.classifier.classWeights", "Neg"),
    ]


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"train": []}, "has an empty train split"),
        ({"valid": None}, "has no valid split"),
        ({"test": []}, "has an empty test split"),
    ],
)
def test_train_valid_and_test_must_hold_rows(
    tmp_path: Path, splits: dict[str, Any], message: str
) -> None:
    data = write_dataset(tmp_path / "d", **splits)
    assert problems(config(data, "pretrain")) == [("data.dataset", str(data), message)]


def test_a_directory_without_splits_or_missing_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    [(field, _, message)] = problems(config(tmp_path / "empty"))
    assert field == "data.dataset" and "holds no train/valid/test" in message
    [(field, _, message)] = problems(config(tmp_path / "nowhere"))
    assert field == "data.dataset" and "no such directory" in message
    [(field, value, message)] = problems(config("builtin://no-such-set"))
    assert (field, value) == ("data.dataset", "builtin://no-such-set") and "known:" in message


def test_rows_need_the_text_and_label_fields(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "pos"}, {"text": "b"}]
    data = write_dataset(tmp_path / "d", valid=rows, unlabeled=[{"body": "no text"}])
    assert problems(config(data)) == [
        ("data.textField", "text", "missing from row 1 of the unlabeled split"),
        ("data.labelField", "label", "missing from row 2 of the valid split"),
    ]


def test_labels_json_must_list_every_label_of_the_data(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d")
    (data / "labels.json").write_text('["pos"]')
    [(field, _, message)] = problems(config(data))
    assert field == "data.labelField" and "label 'neg'" in message and "labels.json" in message


def test_a_cotrain_stage_needs_a_pool_single_labels_and_its_fields(tmp_path: Path) -> None:
    rule = {"label": "pos", "keywords": ["x"]}
    no_pool = write_dataset(tmp_path / "a", unlabeled=None)
    [(field, _, message)] = problems(config(no_pool, "cotrain", **cotrain(rule)))
    assert field == "data.dataset" and "needs a pool" in message
    # A capped train split leaves rows to pseudo-label: no pool problem then.
    capped = config(no_pool, "cotrain", **cotrain(rule))
    check_stages(
        [
            capped.model_copy(
                update={"data": capped.data.model_copy(update={"max_train_examples": 4})}
            )
        ]
    )

    data = write_dataset(tmp_path / "b")
    found = problems(
        config(data, "cotrain", **cotrain(rule, noisyLabelField="weak", textField="title"))
    )
    assert [p[:2] for p in found] == [
        ("stages.cotrain.models[0].textField", "title"),
        ("stages.cotrain.models[0].noisyLabelField", "weak"),
    ]
    multi = write_dataset(tmp_path / "c", train=[{"text": "a", "label": ["pos", "neg"]}])
    [(field, _, message)] = problems(config(multi, "cotrain", **cotrain(rule)))
    assert field == "stages.cotrain" and "one label per document" in message


def test_the_same_problem_in_several_stages_is_listed_once(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "d", test=[])
    found = problems(config(data, "finetune"), config(data), config(data, "evaluate"))
    assert found == [("data.dataset", str(data), "has an empty test split")]


def test_a_failed_progress_record_says_whether_its_input_was_invalid() -> None:
    failed = StageProgress(stage="cotrain-a", state="failed", error="InvalidSpec: x", invalid=True)
    read = parse_progress_line(failed.to_line())
    assert read is not None and read.invalid is True and read.error == "InvalidSpec: x"
    assert "invalid" not in StageProgress(stage="s", state="failed", error="E: y").to_wire()


def test_the_preflight_imports_nothing_heavy() -> None:
    code = (
        "import sys, ulmfit_trainer.preflight, ulmfit_trainer.stages;"
        "heavy = {'torch', 'transformers', 'numpy', 'ulmfit_trainer.data'} & set(sys.modules);"
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
