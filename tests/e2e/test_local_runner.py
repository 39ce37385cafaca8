"""`ulmfit run` end to end: real torchrun, real DeepSpeed on CPU, the embedded data.

The quick job below keeps every stage to a handful of steps so the whole pipeline, an
interruption and a resume fit in a few minutes; the full example has a test of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.store import CheckpointStore, open_store

from tests.harness.stand_in import stand_in_python

ROOT = Path(__file__).resolve().parents[2]
ULMFIT = [sys.executable, "-m", "ulmfit_operator.cli"]

QUICK_JOB = {
    "apiVersion": "ulmfit.io/v1alpha1",
    "kind": "ULMFiTJob",
    "metadata": {"name": "quick"},
    "spec": {
        "data": {
            "maxTrainExamples": 400,
            "maxUnlabeledExamples": 600,
            "maxEvalExamples": 200,
            "maxLength": 64,
        },
        "model": {"architecture": {"layers": 2, "hiddenSize": 64, "heads": 2, "contextLength": 64}},
        "tokenizer": {"vocabSize": 1000},
        "stages": {
            "pretrain": {"maxSteps": 12, "batchSize": 8, "checkpointEvery": 4},
            # Long enough that the interrupt below lands inside it even on a loaded machine.
            "finetune": {"maxSteps": 45, "batchSize": 8, "checkpointEvery": 3},
            "classifier": {
                "unfreezePhases": 2,
                "epochsPerPhase": 0.5,
                "finalEpochs": 0.5,
                "batchSize": 16,
            },
        },
        "storage": {"progressIntervalSeconds": 0.5},
    },
}


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job))
    return path


def ulmfit(*args: str, env: dict[str, str] | None = None, timeout: float = 900):
    return subprocess.run(
        [*ULMFIT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_interrupted_run_resumes_and_finished_stages_are_reused(tmp_path: Path) -> None:
    job = write_job(tmp_path / "quick.yaml", QUICK_JOB)
    workdir = tmp_path / "work"
    checkpoints = CheckpointStore(open_store(workdir / "store"), "default/quick")

    # Interrupt once the fine-tuning stage has committed a mid-stage checkpoint.
    process = subprocess.Popen(
        [*ULMFIT, "run", str(job), "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        # As from a terminal: a test run started in the background inherits SIGINT ignored.
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 900
    while not [c for c in checkpoints.committed("finetune") if not c.final]:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "no finetune checkpoint was committed in time"
        time.sleep(0.1)
    assert checkpoints.final("finetune") is None, "finetune finished before the interrupt"
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "run the same command again to resume" in " ".join(output.split())
    interrupted_at = max(c.step for c in checkpoints.committed("finetune"))
    assert interrupted_at >= 3
    assert checkpoints.final("pretrain") is not None

    rerun = ulmfit("run", str(job), "--workdir", str(workdir))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    result = json.loads((workdir / "result.json").read_text())
    states = {stage["name"]: stage["state"] for stage in result["stages"]}
    assert states == {
        "pretrain": "cached",
        "finetune": "succeeded",
        "classifier": "succeeded",
        "evaluate": "succeeded",
    }
    finetune = checkpoints.final("finetune")
    assert finetune is not None
    assert finetune.meta["resumedFromStep"] >= interrupted_at  # not from zero
    assert 0.0 <= result["test"]["accuracy"] <= 1.0
    assert result["majorityBaseline"] > 0
    assert "test accuracy" in rerun.stdout

    # Everything finished: a third run only reads the store.
    again = ulmfit("run", str(job), "--workdir", str(workdir), timeout=300)
    assert again.returncode == 0, again.stderr
    states = {
        s["name"]: s["state"] for s in json.loads((workdir / "result.json").read_text())["stages"]
    }
    assert set(states.values()) == {"cached"}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_run_with_s3_storage_leaves_the_expected_objects(
    tmp_path: Path, s3_server, s3_bucket
) -> None:
    job = {**QUICK_JOB, "metadata": {"name": "quick-s3"}}
    job["spec"] = {
        **QUICK_JOB["spec"],
        "storage": {"s3": {"endpoint": s3_server.url, "bucket": s3_bucket, "prefix": "runs"}},
    }
    path = write_job(tmp_path / "quick-s3.yaml", job)
    run = ulmfit("run", str(path), "--workdir", str(tmp_path / "work"), env=s3_server.env())
    assert run.returncode == 0, run.stdout + run.stderr

    settings = S3Settings(endpoint=s3_server.url, bucket=s3_bucket, prefix="runs")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.env().items():
            patch.setenv(key, value)
        store = open_store(settings.root, settings)
        checkpoints = CheckpointStore(store, "default/quick-s3")
        for stage in ("pretrain", "finetune", "classifier"):
            latest = checkpoints.latest(stage)
            assert latest is not None and latest.final, stage
        keys = {info.key for info in store.list("default/quick-s3/")}
    assert "default/quick-s3/model/config.json" in keys
    assert any(key.startswith("default/quick-s3/tokenizer/") for key in keys)
    assert not (tmp_path / "work" / "store").exists()  # nothing went to the local disk store
    result = json.loads((tmp_path / "work" / "result.json").read_text())
    assert result["store"] == f"s3://{s3_bucket}/runs"


# ------------------------------------------------------------ the DAG, with a stand-in trainer

# Stands in for `python` (and so for torchrun and the trainer): it logs which stage it was asked
# to run, then commits that stage's final checkpoint the way the trainer does, with metrics a
# co-trained classifier and a sweep report. Real store, real plan, real runner; no torch.
STAND_IN = """
import json, os, sys, tempfile
from pathlib import Path
from ulmfit_trainer.config import StageConfig
from ulmfit_trainer.records import StageProgress
from ulmfit_trainer.store import open_checkpoints

argv = sys.argv[1:]
config = StageConfig.read(argv[argv.index("--config") + 1])
with open(os.environ["STAND_IN_LOG"], "a") as log:
    log.write(json.dumps({"argv": argv, "key": config.key}) + "\\n")
metrics, meta = {"loss": 1.0}, {}
if config.stage == "tune":
    print(StageProgress(stage="tune", state="running", dashboard="http://127.0.0.1:8265").to_line())
    print("| trial_0001 | RUNNING | 0.001 |")
    metrics = {"trials": 4, "trialsCompleted": 3, "trialsStoppedEarly": 1, "trialsFailed": 0,
               "resultsDir": "/tmp/ray"}
    meta = {"bestParams": {"learningRate": 0.003}}
if config.stage == "classifier":
    metrics = {"validAccuracy": 0.8, "pseudoLabels": 30, "pseudoLabels/a": 20,
               "pseudoLabels/b": 10, "pseudoLabelAccuracy": 0.9, "weakLabelAccuracy": 0.7}
if config.stage == "evaluate":
    metrics = {"accuracy": 0.75}
directory = Path(tempfile.mkdtemp())
(directory / "weights.bin").write_bytes(b"w")
open_checkpoints(config).save(
    config.key, "final", directory, meta={"metrics": metrics, **meta}, final=True, step=1
)
"""


def test_local_runner_walks_the_dag_and_summarizes_tune_and_pseudo_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console
    from ulmfit_operator.api import parse_job
    from ulmfit_operator.local import LocalRunner

    python = stand_in_python(tmp_path, STAND_IN)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("STAND_IN_LOG", str(log))
    document = {
        "apiVersion": "ulmfit.io/v1alpha1",
        "kind": "ULMFiTJob",
        "metadata": {"name": "dag"},
        "spec": {
            "stages": {
                "cotrain": {
                    "models": [
                        # Labels of the builtin dataset: the preflight checks every rule's.
                        {"name": "a", "rules": [{"label": "games", "keywords": ["game"]}]},
                        {"name": "b", "rules": [{"label": "net", "keywords": ["network"]}]},
                    ],
                    "rounds": 2,
                },
                "tune": {
                    "space": {"learningRate": {"type": "uniform", "low": 0.001, "high": 0.01}}
                },
            }
        },
    }
    console = Console(record=True, width=120)
    runner = LocalRunner(
        parse_job(document), tmp_path / "work", nproc=2, console=console, python=str(python)
    )
    result = runner.run().to_json()

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    keys = [call["key"] for call in calls]
    assert keys == [
        "finetune",
        "cotrain-a",
        "cotrain-b",
        "cotrain-a-r2",
        "cotrain-b-r2",
        "tune",
        "classifier",
        "evaluate",
    ]
    by_key = {call["key"]: call["argv"] for call in calls}
    # Training stages under torchrun with the stage kind; tune as one plain process.
    assert by_key["cotrain-b-r2"][:4] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
    ]
    assert by_key["cotrain-b-r2"][4:7] == ["-m", "ulmfit_trainer", "cotrain"]
    assert by_key["tune"][:3] == ["-m", "ulmfit_trainer", "tune"]
    assert "torch.distributed.run" not in by_key["tune"]
    output = console.export_text()
    assert "Ray dashboard: http://127.0.0.1:8265" in output
    assert "| trial_0001 | RUNNING | 0.001 |" in output  # the trial table passes through

    assert result["bestParams"] == {"learningRate": 0.003}
    assert result["tune"] == {
        "trials": 4,
        "trialsCompleted": 3,
        "trialsStoppedEarly": 1,
        "trialsFailed": 0,
        "resultsDir": "/tmp/ray",
    }
    assert result["pseudoLabels"] == {
        "total": 30,
        "perClass": {"a": 20, "b": 10},
        "accuracy": 0.9,
        "weakLabelAccuracy": 0.7,
    }
    assert json.loads((tmp_path / "work" / "result.json").read_text())["bestParams"] == {
        "learningRate": 0.003
    }
    # A second run skips every finished stage, per key.
    log.unlink()
    again = LocalRunner(
        parse_job(document), tmp_path / "work", nproc=2, console=console, python=str(python)
    ).run()
    assert not log.exists()
    assert {stage.state for stage in again.stages} == {"cached"}
    assert again.to_json()["bestParams"] == {"learningRate": 0.003}
