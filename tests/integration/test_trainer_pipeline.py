"""The trainer's stages for real: DeepSpeed ZeRO-2 on CPU, 2 processes under torchrun (gloo),
tiny models on the shipped Debian dataset, everything chained through a local store.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ulmfit_trainer.config import (
    ArchitectureSpec,
    ClassifierStageSpec,
    DataSpec,
    LMStageSpec,
    ModelSpec,
    StageConfig,
    TokenizerSpec,
)
from ulmfit_trainer.records import StageProgress, parse_progress_line
from ulmfit_trainer.store import CheckpointStore, open_store

from tests.harness.parts import require_modules

require_modules("torch", "deepspeed", "transformers")

TRAINER = Path(__file__).resolve().parents[2] / "trainer"
RUN = "testing/debian-topics"
VOCAB = 600


def trainer_env() -> dict[str, str]:
    env = dict(os.environ)
    # The subprocesses import the trainer from this checkout, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TRAINER), env.get("PYTHONPATH")) if p)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("RANK", None)
    return env


def command(stage: str, config: Path, nproc: int = 2) -> list[str]:
    module = ["-m", "ulmfit_trainer", stage, "--config", str(config)]
    if nproc == 1:
        return [sys.executable, *module]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={nproc}", *module]


def run_stage(config: StageConfig, tmp: Path, nproc: int = 2, timeout: float = 300):
    path = tmp / f"{config.stage.value}.json"
    config.write(path)
    done = subprocess.run(
        command(config.stage.value, path, nproc),
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done


def metrics_of(stdout: str) -> dict[str, float]:
    lines = [line for line in stdout.splitlines() if "@metrics " in line]
    assert lines, "no @metrics line"
    return json.loads(lines[-1].split("@metrics ", 1)[1])


def progress_of(stdout: str) -> list[StageProgress]:
    found = [parse_progress_line(line) for line in stdout.splitlines()]
    return [report for report in found if report is not None]


def base_config(store: Path, **overrides) -> dict:
    return {
        "run": RUN,
        "store_root": str(store),
        "data": DataSpec(
            max_length=32,
            max_train_examples=320,
            max_unlabeled_examples=600,
            max_eval_examples=160,
        ),
        "model": ModelSpec(
            architecture=ArchitectureSpec(layers=2, hidden_size=32, heads=2, context_length=32)
        ),
        "tokenizer": TokenizerSpec(vocab_size=VOCAB),
        "progress_interval_seconds": 0.5,
        **overrides,
    }


def check(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_pretrain_finetune_classifier_evaluate(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    store = tmp_path / "store"
    checkpoints = CheckpointStore(open_store(store), RUN)
    lm = LMStageSpec(epochs=1, learning_rate=3e-3, batch_size=8, checkpoint_every=1000)
    classifier = ClassifierStageSpec(
        unfreeze_phases=2,
        epochs_per_phase=1,
        final_epochs=1,
        learning_rate=5e-3,
        batch_size=8,
        discriminative_factor=1.5,
        head_hidden_size=32,
    )

    # A stage whose input stage has not run fails with a clear message and a non-zero exit.
    early = StageConfig(stage="classifier", init_from="finetune", classifier=classifier,
                        **base_config(store))  # fmt: skip
    done = run_stage(early, tmp_path, nproc=1)
    assert done.returncode == 1
    assert "no final checkpoint" in done.stderr
    failed = checkpoints.read_progress("classifier")
    assert failed is not None and failed.state == "failed", done.stderr[-3000:]

    # 1. LM pretraining from scratch: the loss really goes down on real text.
    scratch = lm.model_copy(update={"discriminative_factor": 1.0})
    pretrain = StageConfig(stage="pretrain", lm=scratch, **base_config(store))
    done = run_stage(pretrain, tmp_path)
    check(done)
    metrics = metrics_of(done.stdout)
    assert metrics["validLoss"] < math.log(VOCAB) - 1.0  # well below a uniform guess
    lines = progress_of(done.stdout)
    running = [p for p in lines if p.state == "running"]
    assert running and all(
        p.tokens_per_second and p.tokens_per_second > 0 and p.loss is not None for p in running
    )
    assert lines[-1].state == "completed" and lines[-1].step == lines[-1].total_steps
    completed = checkpoints.read_progress("pretrain")
    assert completed is not None and completed.state == "completed"
    assert store.joinpath(RUN, "tokenizer", "tokenizer.json").exists()

    # 2. LM fine-tuning starts from pretraining's final model (and does better than it did).
    finetune = StageConfig(stage="finetune", init_from="pretrain", lm=lm, **base_config(store))
    done = run_stage(finetune, tmp_path)
    check(done)
    assert metrics_of(done.stdout)["validLoss"] < metrics["validLoss"] + 0.5

    # 3. Classifier with gradual unfreezing: phase 1 trains the head only, phase 2 everything.
    config = StageConfig(stage="classifier", init_from="finetune", classifier=classifier,
                         **base_config(store))  # fmt: skip
    done = run_stage(config, tmp_path)
    check(done)
    cls_metrics = metrics_of(done.stdout)
    assert cls_metrics["phases"] == 2 and "validAccuracyPhase1" in cls_metrics
    phases = {c.tag: c for c in checkpoints.committed("classifier")}
    assert set(phases) == {"phase-01", "final"}
    history = phases["final"].meta["history"]
    assert [h["trainableGroups"] for h in history] == [1, 4]  # head, then all 4 groups
    assert history[-1]["trainLoss"] < math.log(8)

    lm_weights = load_file(str(store / RUN / "finetune" / "final" / "model.safetensors"))
    after_phase1 = load_file(str(store / RUN / "classifier" / "phase-01" / "model.safetensors"))
    after_all = load_file(str(store / RUN / "classifier" / "final" / "model.safetensors"))
    frozen = [n for n in after_phase1 if not n.startswith("ln_f.")]
    assert frozen
    for name in frozen:  # below the head group nothing moved in phase 1 ...
        assert torch.equal(after_phase1[name], lm_weights[f"transformer.{name}"]), name
    moved = [n for n in frozen if not torch.equal(after_all[n], after_phase1[n])]
    assert set(moved) == set(frozen)  # ... and everything moved once unfrozen

    # Lose the last phase (a crash before its commit): a rerun resumes after phase 1.
    (store / RUN / "classifier" / "final" / "meta.json").unlink()
    done = run_stage(config, tmp_path)
    check(done)
    assert "resumed at phase 2" in done.stdout
    rerun_history = checkpoints.latest("classifier").meta["history"]
    assert rerun_history[0] == history[0] and len(rerun_history) == 2
    cls_metrics = metrics_of(done.stdout)

    # A rerun of a finished stage returns its stored metrics at once, without torch.
    path = tmp_path / "classifier.json"
    started = time.perf_counter()
    rerun = subprocess.run(command("classifier", path, nproc=1), env=trainer_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert rerun.returncode == 0 and metrics_of(rerun.stdout) == cls_metrics
    assert "already finished" in rerun.stderr
    assert time.perf_counter() - started < 15
    wrong = subprocess.run(command("evaluate", path, nproc=1), env=trainer_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert wrong.returncode == 2 and "configures stage 'classifier'" in wrong.stderr

    # 4. Evaluation and the export that plain transformers loads.
    evaluate = StageConfig(stage="evaluate", init_from="classifier", classifier=classifier,
                           **base_config(store))  # fmt: skip
    done = run_stage(evaluate, tmp_path)
    check(done)
    result = metrics_of(done.stdout)
    assert result["testExamples"] == 160
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["expectedCalibrationError"] <= 1.0
    report = json.loads((store / RUN / "evaluate" / "metrics.json").read_text())
    labels = report["labels"]
    assert len(report["confusionMatrix"]) == len(labels) == len(report["perClass"])
    assert sum(map(sum, report["confusionMatrix"])) == 160
    assert report["summary"] == result
    assert report["majorityBaseline"]["label"] in labels

    model_dir = store / RUN / "model"
    backbone = AutoModel.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert backbone.config.id2label == dict(enumerate(labels))
    encoded = tokenizer(["A daemon serving files over the network."], return_tensors="pt")
    hidden = backbone(**encoded).last_hidden_state
    assert hidden.shape[-1] == 32
    assert (model_dir / "classifier_head.safetensors").exists()
    assert json.loads((model_dir / "classifier_head.json").read_text())["labels"] == labels


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (each worker runs in a session of its own)."""
    import psutil

    try:
        workers = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    os.killpg(process.pid, signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    process.wait(timeout=60)
    psutil.wait_procs(workers, timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lm_stage_resumes_after_a_kill_at_the_last_committed_step(tmp_path: Path) -> None:
    store = tmp_path / "store"
    checkpoints = CheckpointStore(open_store(store), RUN)
    lm = LMStageSpec(epochs=50, max_steps=400, learning_rate=2e-3, batch_size=4,
                     checkpoint_every=5)  # fmt: skip
    config = StageConfig(stage="pretrain", lm=lm, keep_last=3, **base_config(store))
    path = tmp_path / "pretrain.json"
    config.write(path)

    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command("pretrain", path), env=trainer_env(), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            steps = [c.step for c in checkpoints.committed("pretrain") if not c.final]
            if steps and max(steps) >= 10:
                break
            time.sleep(0.1)
        assert first.poll() is None, "the run ended before it could be killed"
        kill_tree(first)  # like a pod going away: torchrun and both workers, no goodbyes
    finally:
        if first.poll() is None:
            kill_tree(first)
        log.close()
    committed = [c for c in checkpoints.committed("pretrain") if not c.final]
    assert committed and not any(c.final for c in checkpoints.committed("pretrain"))
    last = max(c.step for c in committed)
    assert last % 5 == 0 and last < 400
    assert len(committed) <= 3  # pruned to keep_last

    done = subprocess.run(command("pretrain", path), env=trainer_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    check(done)
    assert f"resumed at step {last}" in done.stdout
    lines = [p for p in progress_of(done.stdout) if p.state == "running"]
    assert lines and min(p.step for p in lines) > last  # it never started over
    final = next(c for c in checkpoints.committed("pretrain") if c.final)
    assert final.meta["resumedFromStep"] == last
    assert final.step == 400
