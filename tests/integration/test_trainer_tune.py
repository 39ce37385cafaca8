"""The tune stage for real: a Ray Tune sweep on this machine's CPUs over the classifier stage (a
tiny model on the shipped Debian data), ASHA between unfreezing phases, the dashboard up while it
runs, and the classifier stage that follows training with the sweep's best parameters.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from ulmfit_trainer.config import (
    ArchitectureSpec,
    ClassifierStageSpec,
    DataSpec,
    ModelSpec,
    SearchDomain,
    StageConfig,
    TokenizerSpec,
    TuneSpec,
)
from ulmfit_trainer.records import StageProgress, parse_progress_line
from ulmfit_trainer.store import CheckpointStore, open_store

from tests.harness.parts import require_modules
from tests.integration.test_trainer_pipeline import check, metrics_of, run_stage, trainer_env

require_modules("torch", "deepspeed", "ray.tune")

RUN = "testing/debian-sweep"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_config(store: Path, stage: str, **overrides) -> StageConfig:
    return StageConfig(
        stage=stage,
        run=RUN,
        store_root=str(store),
        data=DataSpec(max_length=32, max_train_examples=160, max_eval_examples=96),
        model=ModelSpec(
            architecture=ArchitectureSpec(layers=1, hidden_size=32, heads=2, context_length=32)
        ),
        tokenizer=TokenizerSpec(vocab_size=400),
        classifier=ClassifierStageSpec(
            unfreeze_phases=3,
            epochs_per_phase=1,
            final_epochs=0,
            batch_size=16,
            head_hidden_size=16,
            discriminative_factor=1.5,
        ),
        progress_interval_seconds=5.0,
        **overrides,
    )


class DashboardProbe(threading.Thread):
    """Polls the Ray dashboard's API while the sweep runs; keeps the first answer."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/api/version"
        self.answer: dict | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and self.answer is None:
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    self.answer = json.loads(response.read())
            except (OSError, ValueError):
                time.sleep(0.5)


def run_tune(config: StageConfig, tmp: Path, port: int, timeout: float = 480):
    """The tune stage as the local runner starts it: one process, no torchrun."""
    path = tmp / "tune.json"
    config.write(path)
    env = trainer_env()
    env["ULMFIT_RAY_DASHBOARD_PORT"] = str(port)
    command = [sys.executable, "-m", "ulmfit_trainer", "tune", "--config", str(path)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the stage shut Ray down; its processes share the session.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        pytest.fail(f"the sweep ran past {timeout}s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def progress_lines(stdout: str) -> list[StageProgress]:
    found = [parse_progress_line(line) for line in stdout.splitlines()]
    return [report for report in found if report is not None]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_asha_sweep_stops_trials_early_and_feeds_the_classifier(tmp_path: Path) -> None:
    store = tmp_path / "store"
    checkpoints = CheckpointStore(open_store(store), RUN)
    tune = TuneSpec(
        space={
            # Two workable rates and a hopeless one: ASHA has something to cut.
            "learningRate": SearchDomain(type="choice", values=[1e-5, 3e-3, 1e-2]),
            "dropout": SearchDomain(type="uniform", low=0.0, high=0.4),
        },
        metric="validLoss",
        mode="min",
        trials=4,
        cpus_per_trial=1,
        scheduler="asha",
        grace_period=1,
    )
    port = free_port()
    probe = DashboardProbe(port)
    probe.start()
    done = run_tune(stage_config(store, "tune", tune=tune), tmp_path, port)
    probe.done.set()
    check(done)

    # The dashboard answered its HTTP API while the sweep ran, and the stage said where it was.
    assert probe.answer is not None and probe.answer.get("ray_version"), "dashboard never answered"
    lines = progress_lines(done.stdout)
    assert any(str(p.dashboard or "").endswith(f":{port}") for p in lines), lines[:3]
    assert "trial" in done.stdout and "status" in done.stdout  # the live trial table

    metrics = metrics_of(done.stdout)
    assert metrics["trials"] == 4 and metrics["trialsFailed"] == 0
    assert metrics["trialsStoppedEarly"] >= 1, done.stdout[-3000:]
    assert metrics["phasesTrained"] < metrics["phasesPlanned"]

    final = next(c for c in checkpoints.committed("tune") if c.final)
    best = final.meta["bestParams"]
    assert set(best) == {"learningRate", "dropout"}
    results = json.loads((store / RUN / "tune" / "final" / "results.json").read_text())
    assert len(results["trials"]) == 4
    assert {t["status"] for t in results["trials"]} <= {"completed", "stopped"}
    winner = next(t for t in results["trials"] if t["trial"] == final.meta["bestTrial"])
    assert winner["params"] == best and winner["metric"] == metrics["bestMetric"]
    # Tune's own results stay in the workdir, next to the stage's checkpoints.
    assert (store / RUN / "tune" / "ray-results" / "sweep").is_dir()

    # The classifier stage that follows trains with the sweep's best parameters.
    classifier = stage_config(store, "classifier", tuned_by="tune")
    done = run_stage(classifier, tmp_path, nproc=1)
    check(done)
    history = next(c for c in checkpoints.committed("classifier") if c.final).meta["history"]
    assert history[0]["peakLr"] == pytest.approx(best["learningRate"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_whose_every_trial_fails_ends_with_the_first_error(tmp_path: Path) -> None:
    store = tmp_path / "store"
    tune = TuneSpec(
        space={"dropout": SearchDomain(type="uniform", low=0.0, high=0.4)},
        trials=2,
        cpus_per_trial=1,
        search_algorithm="optuna",  # the same failure accounting under Optuna's search
    )
    # Documents of 64 tokens through a model whose positions stop at 32: every trial fails on
    # its first batch, whatever it samples.
    config = stage_config(store, "tune", tune=tune).model_copy(
        update={"data": DataSpec(max_length=64, max_train_examples=64, max_eval_examples=32)}
    )
    done = run_tune(config, tmp_path, free_port())
    assert done.returncode == 1, done.stdout[-2000:]
    assert "all 2 trials of the sweep failed" in done.stderr, done.stderr[-3000:]
    progress = CheckpointStore(open_store(store), RUN).read_progress("tune")
    assert progress is not None and progress.state == "failed"
    assert progress.error is not None and "all 2 trials" in progress.error


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_concurrent_trials_bounds_a_random_search_and_one_worker_runs_them_all(
    tmp_path: Path,
) -> None:
    """`concurrentTrials: 1` on a machine with CPUs for two: the trials run one after another,
    and the worker that finished one takes the next (Tune's actor reuse), so torch and
    DeepSpeed are set up once. Tune ignores its own concurrency limit for the random search's
    generator; this is the test that it is passed where it counts."""
    store = tmp_path / "store"
    tune = TuneSpec(
        space={"dropout": SearchDomain(type="uniform", low=0.0, high=0.4)},
        trials=3,
        concurrent_trials=1,
        cpus_per_trial=1,
    )
    config = stage_config(store, "tune", tune=tune)
    assert config.classifier is not None
    one_phase = config.classifier.model_copy(update={"unfreeze_phases": 1})
    done = run_tune(config.model_copy(update={"classifier": one_phase}), tmp_path, free_port())
    check(done)
    assert metrics_of(done.stdout)["trialsCompleted"] == 3

    results = sorted((store / RUN / "tune" / "ray-results" / "sweep").glob("*/result.json"))
    reports = [
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for path in results
    ]
    assert len(reports) == 3 and all(reports), results
    assert len({r["pid"] for trial in reports for r in trial}) == 1, "more than one worker"
    # One after another: each trial started after the one before it reported last.
    spans = sorted(
        (trial[0]["timestamp"] - trial[0]["time_this_iter_s"], trial[-1]["timestamp"])
        for trial in reports
    )
    for (_, ended), (started, _) in itertools.pairwise(spans):
        assert started >= ended - 1, spans  # `timestamp` is whole seconds
