"""The `ulmfit` command line: exit codes, error messages, and the README kept in sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner
from ulmfit_operator.cli import EXIT_INVALID_SPEC, app
from ulmfit_operator.reference import END_MARKER, START_MARKER, render_reference

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

BAD_JOB = """
apiVersion: ulmfit.io/v1alpha1
kind: ULMFiTJob
metadata: {name: bad}
spec:
  stages:
    classifier: {learningRate: -1, epochsPerPhase: 0}
  resources: {workers: 0}
"""


def test_run_rejects_an_invalid_job_before_writing_anything(tmp_path: Path) -> None:
    job = tmp_path / "bad.yaml"
    job.write_text(BAD_JOB)
    workdir = tmp_path / "work"
    result = runner.invoke(app, ["run", str(job), "--workdir", str(workdir)])
    assert result.exit_code == EXIT_INVALID_SPEC
    output = result.output
    assert "spec.stages.classifier.learningRate" in output and "-1" in output
    assert "spec.stages.classifier.epochsPerPhase" in output
    assert "spec.resources.workers" in output
    assert not workdir.exists()


def test_validation_messages_are_printed_verbatim(tmp_path: Path) -> None:
    """A message with brackets (a regular expression) is not eaten as console markup."""
    job = tmp_path / "bucket.yaml"
    job.write_text(
        "apiVersion: ulmfit.io/v1alpha1\nkind: ULMFiTJob\nmetadata: {name: bucket}\n"
        "spec:\n  storage:\n    s3: {endpoint: 'minio:9000', bucket: Not_A_Bucket}\n"
    )
    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code == EXIT_INVALID_SPEC
    assert "spec.storage.s3.bucket" in result.output
    assert "'^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$'" in result.output, result.output
    assert "(got 'Not_A_Bucket')" in result.output


def test_run_on_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == EXIT_INVALID_SPEC
    assert "cannot read" in result.output


def test_validate_prints_the_job_with_defaults() -> None:
    result = runner.invoke(app, ["validate", str(ROOT / "examples" / "ulmfitjob.yaml")])
    assert result.exit_code == 0, result.output
    assert '"discriminativeFactor": 2.6' in result.output


def test_plan_lists_the_stages_in_order() -> None:
    result = runner.invoke(app, ["plan", str(ROOT / "examples" / "ulmfitjob-scratch.yaml")])
    assert result.exit_code == 0, result.output
    order = [
        result.output.index(name) for name in ("pretrain", "finetune", "classifier", "evaluate")
    ]
    assert order == sorted(order)


def test_plan_shows_what_each_stage_waits_for() -> None:
    result = runner.invoke(app, ["plan", str(ROOT / "examples" / "ulmfitjob-cotrain.yaml")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the console may wrap long lines
    assert "3. cotrain-first starts from finetune (distributed, after finetune)" in text
    assert "4. cotrain-second starts from finetune (distributed, after finetune)" in text
    assert "(distributed, after cotrain-first, cotrain-second)" in text


def test_readme_reference_matches_the_api_models() -> None:
    readme = (ROOT / "README.md").read_text()
    embedded = readme.split(START_MARKER, 1)[1].split(END_MARKER, 1)[0].strip()
    assert embedded == render_reference().strip(), (
        "README's ULMFiTJob reference is stale: run `python scripts/sync_readme.py`"
    )
    assert "| `spec.stages.pretrain.enabled` | boolean | `false` |" in embedded
    assert "| `spec.stages.finetune.enabled` | boolean | `true` |" in embedded


def test_predict_hands_its_options_to_the_trainer(tmp_path: Path) -> None:
    from ulmfit_operator.cli import predict_command

    command = predict_command(
        "s3://bucket/run/model", ["a text"], file=tmp_path / "t.txt", explain=True, top_k=3,
        labels="a,b", verbalizers=["a=alpha"], s3_endpoint="http://127.0.0.1:9000",
    )  # fmt: skip
    assert command[:4] == [sys.executable, "-m", "ulmfit_trainer", "predict"]
    assert command[4:6] == ["s3://bucket/run/model", "a text"]
    options = " ".join(command[6:])
    for expected in ("--top-k 3", f"--file {tmp_path / 't.txt'}", "--explain", "--labels a,b",
                     "--verbalizer a=alpha", "--s3-endpoint http://127.0.0.1:9000"):  # fmt: skip
        assert expected in options


def test_predict_on_a_missing_model_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(tmp_path / "nope"), "some text"])
    assert result.exit_code == EXIT_INVALID_SPEC
    done = subprocess.run(
        [sys.executable, "-m", "ulmfit_trainer", "predict", str(tmp_path / "nope"), "x"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "not a model directory" in done.stderr
    assert "torch" not in done.stderr  # rejected before any heavy import


QUICK_JOB = "apiVersion: ulmfit.io/v1alpha1\nkind: ULMFiTJob\nmetadata: {name: quick}\n"


def _failing_run(tmp_path: Path, monkeypatch, failure) -> object:
    """`ulmfit run` whose runner raises ``failure`` (no stage, no data read)."""
    from ulmfit_operator.local import LocalRunner

    def run(self):
        raise failure

    monkeypatch.setattr(LocalRunner, "run", run)
    job = tmp_path / "quick.yaml"
    job.write_text(QUICK_JOB)
    return runner.invoke(app, ["run", str(job), "--workdir", str(tmp_path / "work")])


def test_a_stage_with_invalid_input_prints_the_trainers_line_and_exits_2(
    tmp_path: Path, monkeypatch
) -> None:
    from ulmfit_operator.local import StageFailed

    log = tmp_path / "work" / "logs" / "cotrain-a.log"
    error = "InvalidSpec: stages.cotrain.models[0].rules[0].label: not a label (got 'gamez')"
    tail = ["Traceback (most recent call last):", "ChildFailedError:"]
    result = _failing_run(
        tmp_path, monkeypatch, StageFailed("cotrain-a", 1, log, tail, error=error, invalid=True)
    )
    assert result.exit_code == EXIT_INVALID_SPEC, result.output
    assert f"✗ cotrain-a failed: {error}" in result.output
    assert f"log: {log}" in result.output
    assert "ChildFailedError" not in result.output and "Traceback" not in result.output


def test_a_stage_that_fails_otherwise_exits_1_with_its_line_or_its_log_tail(
    tmp_path: Path, monkeypatch
) -> None:
    from ulmfit_operator.cli import EXIT_FAILED
    from ulmfit_operator.local import StageFailed

    log = tmp_path / "finetune.log"
    failed = StageFailed("finetune", 1, log, ["torch says"], error="RuntimeError: out of memory")
    result = _failing_run(tmp_path, monkeypatch, failed)
    assert result.exit_code == EXIT_FAILED
    assert "✗ finetune failed: RuntimeError: out of memory" in result.output
    assert "torch says" not in result.output
    # No error line from the trainer (it crashed): the end of the log stands in for it.
    result = _failing_run(tmp_path, monkeypatch, StageFailed("finetune", -9, log, ["killed"]))
    assert result.exit_code == EXIT_FAILED
    assert "✗ finetune failed: exit code -9" in result.output and "  killed" in result.output
    assert f"log: {log}" in result.output
