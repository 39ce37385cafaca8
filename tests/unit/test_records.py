"""The typed records of the trainer/operator seam (``ulmfit_trainer.records``).

What the writers write (the store's commit, the progress writer, the sweep's board, the evaluate
stage's summary) parses back to the same record, and a malformed ``meta.json`` or
``progress.json`` written by someone else gives a clear error or ``None``, never a crash.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from ulmfit_trainer.config import ClassifierStageSpec, SearchDomain, StageConfig, TuneSpec
from ulmfit_trainer.progress import report_progress
from ulmfit_trainer.records import (
    PROGRESS_PREFIX,
    EvaluationSummary,
    StageProgress,
    StageResult,
    load_progress,
    numeric_values,
    parse_checkpoint_record,
    parse_evaluation,
    parse_progress,
    parse_progress_line,
)
from ulmfit_trainer.stages.sweep import Board, TrialRecord
from ulmfit_trainer.store import CheckpointCorrupt, CheckpointStore, LocalStore, StoreError

RUN = "team-a/records"


@pytest.fixture
def checkpoints(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(LocalStore(tmp_path / "store"), RUN)


def checkpoint_dir(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"w" * 100)
    (path / "sub" / "state.pt").write_bytes(b"s" * 10)
    return path


def meta_path(tmp_path: Path, stage: str, tag: str) -> Path:
    return tmp_path / "store" / RUN / stage / tag / "meta.json"


# ---------------------------------------------------------------------------------- progress


def test_progress_line_and_json_round_trip() -> None:
    record = StageProgress(
        stage="classifier", state="running", phase="2/3", step=40, total_steps=100, loss=2.5,
        tokens_per_second=1e4, metrics={"validAccuracy": 0.5},
    )  # fmt: skip
    line = record.to_line()
    assert line.startswith(PROGRESS_PREFIX) and "\n" not in line
    wire = json.loads(line[len(PROGRESS_PREFIX) :])
    assert wire["totalSteps"] == 100 and wire["tokensPerSecond"] == 1e4
    assert "error" not in wire and "dashboard" not in wire  # unset fields stay off the wire
    assert wire["updatedAt"].endswith("Z")
    assert parse_progress_line(line + "\n") == record
    assert parse_progress(record.to_json()) == record
    assert parse_progress(record.to_json().encode()) == record


def test_progress_keeps_unknown_keys_and_nan() -> None:
    record = StageProgress(stage="lm", state="running", loss=math.nan, note="from a newer writer")
    back = parse_progress_line(record.to_line())
    assert back is not None and math.isnan(back.loss or 0.0)
    assert back.model_extra == {"note": "from a newer writer"}


@pytest.mark.parametrize(
    "line",
    [
        "plain log line",
        "@progress not json",
        "@progress [1, 2]",
        '@progress {"stage": "lm"}',  # no state
        '@progress {"stage": "lm", "state": "running", "step": "many"}',
    ],
)
def test_a_line_that_is_not_a_progress_record_is_none(line: str) -> None:
    assert parse_progress_line(line) is None


def test_load_progress_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="state"):
        load_progress('{"stage": "lm"}')
    with pytest.raises(ValueError, match="JSON object"):
        load_progress("[]")
    with pytest.raises(ValueError):
        load_progress(b"\xff\xfe")


def test_a_progress_record_read_keeps_its_own_time() -> None:
    """A record without `updatedAt` must not read as fresh progress."""
    record = load_progress({"stage": "lm", "state": "running"})
    assert record.updated_at == ""
    assert StageProgress(stage="lm", state="running").updated_at.endswith("Z")


def test_store_progress_round_trip_and_unreadable_records(
    checkpoints: CheckpointStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert checkpoints.read_progress("finetune") is None
    failed = StageProgress(stage="finetune", state="failed", error="Boom: no", rank=1)
    assert checkpoints.write_progress("finetune", failed) is failed
    path = tmp_path / "store" / RUN / "finetune" / "progress.json"
    wire = json.loads(path.read_text())
    assert wire["error"] == "Boom: no" and wire["rank"] == 1 and wire["stage"] == "finetune"
    assert checkpoints.read_progress("finetune") == failed

    for body in ("{not json", "[]", '{"stage": "finetune"}', '{"state": 3}'):
        path.write_text(body)
        with caplog.at_level(logging.WARNING, logger="ulmfit_trainer.store"):
            caplog.clear()
            assert checkpoints.read_progress("finetune") is None
        assert "ignoring unreadable" in caplog.text and "progress.json" in caplog.text


def test_report_progress_prints_the_line_writes_the_store_and_survives_a_bad_store(
    checkpoints: CheckpointStore,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = StageProgress(stage="pretrain", state="running", step=3, total_steps=9)
    assert report_progress(checkpoints, record) is record
    assert parse_progress_line(capsys.readouterr().out.strip()) == record
    assert checkpoints.read_progress("pretrain") == record

    class Broken:
        def write_progress(self, stage: str, progress: StageProgress) -> StageProgress:
            raise StoreError("store is down")

    with caplog.at_level(logging.WARNING, logger="ulmfit_trainer.progress"):
        report_progress(Broken(), record)  # type: ignore[arg-type]
    assert "could not write progress: store is down" in caplog.text
    assert parse_progress_line(capsys.readouterr().out.strip()) == record


def test_the_sweep_board_writes_what_parses_back(
    checkpoints: CheckpointStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    domain = SearchDomain(type="uniform", low=0.0, high=0.5)
    tune = TuneSpec(space={"dropout": domain}, trials=3, metric="validLoss", mode="min")
    config = StageConfig(
        stage="tune", run=RUN, store_root=str(tmp_path / "store"),
        classifier=ClassifierStageSpec(), tune=tune,
    )  # fmt: skip
    board = Board(config, checkpoints, dashboard="http://127.0.0.1:8265")
    board.records = {
        "trial-1-a": TrialRecord("trial-1-a", {"dropout": 0.1}, "completed", 0.2, 2, 2),
        "trial-2-b": TrialRecord("trial-2-b", {"dropout": 0.4}, "running", 0.3, 1, 2),
    }
    written = board.report("completed", metrics={"bestMetric": 0.2}, best_params={"dropout": 0.1})
    stored = checkpoints.read_progress("tune")
    printed = parse_progress_line(capsys.readouterr().out.strip())
    assert stored == written == printed
    assert written.step == 1 and written.total_steps == 3
    assert written.trials is not None and written.trials["trialsRunning"] == 1
    assert (written.best_trial, written.best_metric) == ("trial-1-a", 0.2)  # mode min
    assert written.best_params == {"dropout": 0.1} and written.dashboard.endswith(":8265")
    wire = json.loads(written.to_json())
    assert "phase" not in wire and wire["bestParams"] == {"dropout": 0.1}


# ------------------------------------------------------------------------------- checkpoints


def test_commit_writes_the_meta_json_format_and_reads_it_back(
    checkpoints: CheckpointStore, tmp_path: Path
) -> None:
    src = checkpoint_dir(tmp_path / "c")
    meta = {"metrics": {"validLoss": math.nan, "accuracy": 0.5}, "note": None}
    saved = checkpoints.save("classifier", "phase-01", src, meta, step=7)
    raw = meta_path(tmp_path, "classifier", "phase-01").read_bytes()
    wire = json.loads(raw)
    assert set(wire) == {
        "formatVersion", "stage", "tag", "step", "phase", "final", "createdAt", "meta", "files",
    }  # fmt: skip
    assert wire["phase"] is None and wire["formatVersion"] == 1 and wire["step"] == 7
    assert wire["meta"]["note"] is None and math.isnan(wire["meta"]["metrics"]["validLoss"])
    assert [set(f) for f in wire["files"]] == [{"path", "size", "sha256"}] * 2
    assert (
        raw.endswith(b"}\n") and raw.decode() == json.dumps(wire, indent=2, sort_keys=True) + "\n"
    )

    record = parse_checkpoint_record(raw)
    assert record.to_json() == raw.decode()
    assert [f.path for f in record.files] == ["sub/state.pt", "weights.bin"]
    (read,) = checkpoints.committed("classifier")
    assert (read.uri, read.step, read.phase, read.final) == (saved.uri, 7, None, False)
    assert (read.created_at, read.files, read.key) == (saved.created_at, saved.files, saved.key)
    assert read.meta["note"] is None and read.meta["metrics"]["accuracy"] == 0.5


def test_a_meta_json_of_the_earlier_writer_still_reads() -> None:
    earlier = {
        "createdAt": "2026-01-02T03:04:05.678Z", "final": True, "formatVersion": 1,
        "meta": {"metrics": {"accuracy": 0.9}, "modelUri": "s3://b/m"}, "phase": 3,
        "stage": "evaluate", "step": 12, "tag": "final",
        "files": [{"path": "metrics.json", "sha256": "ab" * 32, "size": 5}],
    }  # fmt: skip
    record = parse_checkpoint_record(json.dumps(earlier, indent=2))
    assert record.final and record.phase == 3 and record.created_at == earlier["createdAt"]
    assert record.result().model_uri == "s3://b/m"
    assert record.result().numeric_metrics() == {"accuracy": 0.9}


def test_a_record_without_a_time_reads_as_no_time() -> None:
    record = parse_checkpoint_record('{"stage": "lm", "tag": "final", "files": []}')
    assert record.created_at == ""


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("{broken", "Expecting"),
        ("[]", "JSON object"),
        ('{"stage": "lm", "tag": "x"}', "files"),
        ('{"stage": "lm", "tag": "x", "files": [{"path": "a", "size": "big", "sha256": "0"}]}',
         "files.0.size"),
        ('{"stage": "lm", "tag": "x", "files": [{"path": "a", "size": -1, "sha256": "0"}]}',
         "files.0.size"),
        ('{"stage": "lm", "tag": "x", "files": [{"size": 1, "sha256": "0"}]}', "files.0.path"),
        ('{"tag": "x", "files": []}', "stage"),
    ],
)  # fmt: skip
def test_parse_checkpoint_record_names_what_is_wrong(body: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_checkpoint_record(body)


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\xff not json",
        b'{"stage": "lm", "tag": "phase-02"}',
        b'{"stage": "lm", "tag": "phase-02", "files": [{"path": "../escape", "size": 1,'
        b' "sha256": "0"}]}',
        b'{"stage": "lm", "tag": "phase-02", "files": [{"path": "/abs", "size": 1,'
        b' "sha256": "0"}]}',
    ],
)
def test_a_malformed_meta_json_is_a_corrupt_checkpoint_never_a_crash(
    checkpoints: CheckpointStore, tmp_path: Path, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    src = checkpoint_dir(tmp_path / "c")
    checkpoints.save("lm", "phase-01", src, {}, step=1)
    checkpoints.save("lm", "phase-02", src, {}, step=2)
    meta_path(tmp_path, "lm", "phase-02").write_bytes(body)

    with caplog.at_level(logging.WARNING, logger="ulmfit_trainer.store"):
        assert [c.tag for c in checkpoints.committed("lm")] == ["phase-01"]
    assert "ignoring checkpoint" in caplog.text and "is unreadable" in caplog.text
    with pytest.raises(CheckpointCorrupt, match=r"phase-02/meta\.json is unreadable"):
        checkpoints._read_record("lm", "phase-02")
    # Loading the newest falls back to the one that reads.
    assert checkpoints.load("lm", tmp_path / "out").tag == "phase-01"


# ------------------------------------------------------------------------ results and metrics


def test_stage_result_meta_keeps_what_the_stage_set() -> None:
    meta = StageResult(metrics={"a": 1}, best_params={"dropout": 0.1}).to_meta() | {"x": None}
    assert meta == {"metrics": {"a": 1}, "bestParams": {"dropout": 0.1}, "x": None}
    evaluate = StageResult(metrics={"accuracy": 0.5}, model_uri="s3://b/model").to_meta()
    assert evaluate == {"metrics": {"accuracy": 0.5}, "modelUri": "s3://b/model"}
    assert StageResult.model_validate(evaluate).model_uri == "s3://b/model"


def test_evaluation_summary_round_trip_and_partial_metrics() -> None:
    summary = EvaluationSummary(
        accuracy=0.75, macro_f1=0.7, majority_baseline_accuracy=0.5,
        expected_calibration_error=0.1, test_examples=4,
    )  # fmt: skip
    wire = summary.to_wire()
    assert list(wire) == [
        "accuracy", "macroF1", "majorityBaselineAccuracy", "expectedCalibrationError",
        "testExamples",
    ]  # fmt: skip
    assert wire["testExamples"] == 4.0 and isinstance(wire["testExamples"], float)
    assert parse_evaluation(wire) == summary
    assert parse_evaluation({**wire, "extra": 1}) is not None
    assert parse_evaluation({"accuracy": 0.75}) is None
    assert parse_evaluation({**wire, "accuracy": "high"}) is None


def test_numeric_values_keep_finite_numbers_only() -> None:
    raw = {"a": 1, "b": 0.5, "c": True, "d": "x", "e": math.inf, "f": None, "g": [1]}
    assert numeric_values(raw) == {"a": 1.0, "b": 0.5}
    assert numeric_values(["not", "a", "mapping"]) == {}


def test_a_completed_report_reads_back_whole() -> None:
    """The completed report of a training stage, as the engine makes it, reads back whole."""
    record = StageProgress(
        **{"stage": "classifier", "phase": None, "step": 9, "total_steps": 9, "state": "completed",
           "loss": 0.1, "tokens_per_second": 1.0, "metrics": {"validAccuracy": 1.0}}
    )  # fmt: skip
    back = parse_progress_line(record.to_line())
    assert back == record and back is not None and back.metrics == {"validAccuracy": 1.0}
