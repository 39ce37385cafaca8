"""Bad input fails fast and clearly: `ulmfit run`'s preflight, a trainer stage's own check, and
the trainer's error line (not torchrun's traceback) with exit 2 when a stage finds its input
invalid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner
from ulmfit_operator import cli
from ulmfit_operator.api import parse_job
from ulmfit_operator.cli import EXIT_INVALID_SPEC, app
from ulmfit_operator.local import LocalRunner, StageFailed
from ulmfit_trainer.records import parse_progress_line
from ulmfit_trainer.store import CheckpointStore, open_store

from tests.harness.stand_in import stand_in_python
from tests.unit.test_preflight import config, cotrain, write_dataset

ROOT = Path(__file__).resolve().parents[2]
ULMFIT = [sys.executable, "-m", "ulmfit_operator.cli"]

pytestmark = pytest.mark.timeout(180)


def job(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ulmfit.io/v1alpha1",
        "kind": "ULMFiTJob",
        "metadata": {"name": name},
        "spec": {"model": {"architecture": {"layers": 1, "hiddenSize": 32, "heads": 2}}, **spec},
    }


def ulmfit_run(tmp_path: Path, document: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    return subprocess.run(
        [*ULMFIT, "run", str(path), "--workdir", str(tmp_path / "work"), "--nproc", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
        cwd=ROOT,
    )


def stage_logs(tmp_path: Path) -> list[Path]:
    logs = tmp_path / "work" / "logs"
    return sorted(logs.iterdir()) if logs.exists() else []


BAD_RULE = {
    "cotrain": {
        "models": [{"name": "a", "rules": [{"label": "gamez", "keywords": ["game"]}]}],
        "minAgreement": 1,
    }
}


@pytest.mark.parametrize(
    ("stages", "field", "label"),
    [
        (BAD_RULE, "stages.cotrain.models[0].rules[0].label", "gamez"),
        ({"classifier": {"classWeights": {"x11": 2.0, "X-11": 3.0}}}, "classWeights", "X-11"),
    ],
)
def test_run_with_a_label_the_data_lacks_fails_before_any_stage(
    tmp_path: Path, stages: dict[str, Any], field: str, label: str
) -> None:
    started = time.monotonic()
    done = ulmfit_run(tmp_path, job("bad-label", stages=stages))
    assert done.returncode == EXIT_INVALID_SPEC, done.stdout + done.stderr
    assert time.monotonic() - started < 60  # seconds, not a finetune stage
    problem = next(line for line in done.stderr.splitlines() if field in line)
    assert repr(label) in problem and "is not a label of the dataset" in problem
    assert "no stage ran" in done.stderr
    assert "▶" not in done.stdout and stage_logs(tmp_path) == []


def test_run_with_an_empty_train_split_fails_with_exit_2_naming_the_split(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=[])
    done = ulmfit_run(tmp_path, job("empty-train", data={"dataset": str(data)}))
    assert done.returncode == EXIT_INVALID_SPEC, done.stdout + done.stderr
    assert f"data.dataset: has an empty train split (got '{data}')" in done.stderr
    assert stage_logs(tmp_path) == []


def test_a_stage_that_finds_its_input_invalid_shows_the_trainers_line_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the runner's preflight (switched off here), the trainer's own check fails the first
    stage under real torchrun: its error line, not torchrun's ChildFailedError, and exit 2."""
    data = write_dataset(tmp_path / "data", train=[])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job("empty-train", data={"dataset": str(data)})))
    monkeypatch.setattr(LocalRunner, "preflight", lambda self: None)
    monkeypatch.setattr(cli, "errors", Console(stderr=True, width=300))
    result = CliRunner().invoke(
        app, ["run", str(path), "--workdir", str(tmp_path / "work"), "--nproc", "1"]
    )
    output = result.output
    assert result.exit_code == EXIT_INVALID_SPEC, output
    line = f"✗ finetune failed: InvalidSpec: data.dataset: has an empty train split (got '{data}')"
    assert line in output
    log = tmp_path / "work" / "logs" / "finetune.log"
    assert f"log: {log}" in output
    assert "ChildFailedError" not in output and "Traceback" not in output
    assert "InvalidSpec" in log.read_text()  # the details stay in the log


def test_a_trainer_stage_run_directly_on_a_bad_label_exits_2_and_records_it(
    tmp_path: Path,
) -> None:
    data = write_dataset(tmp_path / "data")
    stage = config(data, "cotrain", **cotrain({"label": "postive", "keywords": ["good"]}))
    stage = stage.model_copy(update={"store_root": str(tmp_path / "store")})
    config_path = tmp_path / "cotrain.json"
    stage.write(config_path)
    done = subprocess.run(
        [sys.executable, "-m", "ulmfit_trainer", "cotrain", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    [report] = [r for r in map(parse_progress_line, done.stdout.splitlines()) if r is not None]
    assert report.state == "failed" and report.invalid is True
    assert report.error is not None
    assert report.error.startswith("InvalidSpec: stages.cotrain.models[0].rules[0].label")
    assert "'postive'" in report.error
    stored = CheckpointStore(open_store(tmp_path / "store"), "default/job").read_progress("cotrain")
    assert stored is not None and stored.invalid is True and stored.error == report.error


# A stand-in for `python` (torchrun and the trainer): it writes a failed progress record to the
# store, as a failing rank does, prints a torchrun-like traceback and exits 1.
STAND_IN = """
import os, sys
from ulmfit_trainer.config import StageConfig
from ulmfit_trainer.records import StageProgress
from ulmfit_trainer.store import open_checkpoints

argv = sys.argv[1:]
config = StageConfig.read(argv[argv.index("--config") + 1])
if os.environ.get("STAND_IN_RECORDS"):
    report = StageProgress(stage=config.key, state="failed", error="RuntimeError: no cheese")
    open_checkpoints(config).write_progress(config.key, report)
print("Traceback (most recent call last):")
print("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:")
sys.exit(1)
"""


def test_the_error_line_is_read_from_the_store_when_stdout_lacks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = stand_in_python(tmp_path, STAND_IN)
    work = tmp_path / "work"
    store = CheckpointStore(open_store(work / "store"), "default/boom")
    old = {"stage": "finetune", "state": "failed", "error": "Old: stale", "updatedAt": "2000"}
    store.store.put_bytes("default/boom/finetune/progress.json", json.dumps(old).encode())

    def fail(records: bool) -> StageFailed:
        monkeypatch.setenv("STAND_IN_RECORDS", "1" if records else "")
        runner = LocalRunner(
            parse_job(job("boom")), work, nproc=1, console=Console(quiet=True), python=str(python)
        )
        runner.preflight = lambda: None  # type: ignore[method-assign]
        with pytest.raises(StageFailed) as caught:
            runner.run()
        return caught.value

    # A failure an earlier attempt left in the store is not taken for this one's: no error line,
    # so `ulmfit run` shows the log's tail.
    stale = fail(records=False)
    assert (stale.error, stale.invalid) == (None, False)
    assert str(stale) == "finetune failed: exit code 1"
    assert "Traceback (most recent call last):" in stale.tail

    failure = fail(records=True)
    assert (failure.stage, failure.error, failure.invalid) == (
        "finetune",
        "RuntimeError: no cheese",
        False,
    )
    assert str(failure) == "finetune failed: RuntimeError: no cheese"


def test_a_stage_checks_an_s3_dataset_on_the_rows_it_downloaded_once(
    tmp_path: Path, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3 dataset is not fetched a second time for the preflight: the runner leaves it to the
    stage, whose own download (`Context.dataset`) is checked before any training."""
    from types import SimpleNamespace

    from ulmfit_trainer import stages
    from ulmfit_trainer.config import S3Settings, StageName
    from ulmfit_trainer.errors import InvalidSpec
    from ulmfit_trainer.store import publish

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3 = S3Settings(endpoint=s3_server.url, bucket=s3_bucket)
    uri = publish(write_dataset(tmp_path / "data"), f"s3://{s3_bucket}/datasets/small", s3)
    bad = config(uri, classifier={"classWeights": {"no-such-label": 2.0}})
    bad = bad.model_copy(update={"s3": s3})

    # The runner does not run the preflight (a download) for an S3 dataset ...
    checked: list[object] = []
    monkeypatch.setattr(stages, "check_stages", checked.append)
    stage = SimpleNamespace(run=lambda c: {"ran": 1.0})
    monkeypatch.setitem(sys.modules, "ulmfit_fake_stage", stage)
    monkeypatch.setitem(stages.MODULES, StageName.CLASSIFIER, "ulmfit_fake_stage")
    assert stages.stage_runner(StageName.CLASSIFIER)(bad) == {"ran": 1.0}
    assert checked == []
    # ... the stage's dataset, downloaded once, is checked instead.
    context = stages.Context(bad, None, None, tmp_path / "work")  # type: ignore[arg-type]
    with pytest.raises(InvalidSpec) as caught:
        context.dataset()
    assert any(field.endswith("classWeights") for field, _, _ in caught.value.problems)
