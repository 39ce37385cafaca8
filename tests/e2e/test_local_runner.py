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
from ulmfit_trainer.store import CheckpointStore, S3Settings, open_store

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
            "finetune": {"maxSteps": 30, "batchSize": 8, "checkpointEvery": 3},
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
    )
    deadline = time.monotonic() + 900
    while not [c for c in checkpoints.committed("finetune") if not c.final]:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline, "no finetune checkpoint was committed in time"
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "run the same command again to resume" in " ".join(output.split())
    interrupted_at = max(c.step for c in checkpoints.committed("finetune"))
    assert interrupted_at >= 3
    assert checkpoints.latest("pretrain").final

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
    finetune = checkpoints.latest("finetune")
    assert finetune.final
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
