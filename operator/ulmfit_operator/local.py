"""Runs a Plan on this machine: each stage a subprocess, the same store layout.

Here live `LocalRunner` (runs the stages, follows each one's ``@progress`` lines, a
``records.StageProgress``, on a progress bar), the run's result (`RunResult`, `run_summary`:
what ``result.json`` holds) and its table for the console.

The plan's stages run one after another in its (topological) order: co-trained models that a
cluster runs side by side run here in turn. Training stages run under torchrun; the tune stage
is one process that starts Ray on the local cores by itself, and its output (the live trial
table) is shown as it comes.

Before the first stage it runs, the runner checks the data against every stage still to run
(`ulmfit_trainer.preflight`: splits present, every label the spec names found in the data), so a
bad weak-label rule fails in seconds with `InvalidSpec` instead of after the LM stages. A stage
that fails raises `StageFailed` carrying the trainer's own error line, taken from the `failed`
`StageProgress` the trainer reports (on stdout, else in the store), and whether it marked its
input `invalid` (then `ulmfit run` exits 2); torchrun's traceback stays in the stage's log.

A stage whose final checkpoint is already committed in the store is not run again, and a stage
that was interrupted resumes from its latest checkpoint (the trainer does that by itself), so
rerunning `ulmfit run` after Ctrl-C or a crash continues where it stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from ulmfit_trainer.config import StageName
from ulmfit_trainer.errors import PermanentError, UlmfitError
from ulmfit_trainer.preflight import check_stages
from ulmfit_trainer.records import (
    StageProgress,
    now_iso,
    parse_evaluation,
    parse_progress_line,
)
from ulmfit_trainer.store import CheckpointStore, StoreError, open_store

from ulmfit_operator.api import ULMFiTJob
from ulmfit_operator.plan import Plan, PlannedStage, make_plan
from ulmfit_operator.status import pseudo_label_stats

EVALUATION_REPORT = "metrics.json"  # what the evaluate stage stores beside its checkpoint
LOG_TAIL_LINES = 30
STOP_GRACE_SECONDS = 15.0
TUNE_SUMMARY = ("trials", "trialsCompleted", "trialsStoppedEarly", "trialsFailed", "resultsDir")
"""The tune stage's metrics that result.json repeats under `tune`."""


class StageFailed(UlmfitError):
    """A stage exited non-zero (or committed no final checkpoint).

    `error` is the trainer's own error line (`InvalidSpec: data.dataset: ...`) when it reported
    one, and `invalid` says it found its input invalid; `tail` is the end of the stage's log.
    """

    def __init__(
        self,
        stage: str,
        returncode: int,
        log_path: Path,
        tail: list[str],
        error: str | None = None,
        invalid: bool = False,
    ):
        self.stage, self.returncode, self.log_path, self.tail = stage, returncode, log_path, tail
        self.error, self.invalid = error, invalid
        reason = error or f"exit code {returncode}"
        super().__init__(f"{stage} failed: {reason}")


class Interrupted(UlmfitError):
    """The user stopped the run; everything committed so far is kept for the next run."""


@dataclass
class StageOutcome:
    name: str
    state: str  # "succeeded" | "cached" | "failed"
    duration_seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    model_uri: str | None = None
    best_params: dict[str, Any] | None = None
    kind: str = ""


@dataclass
class RunResult:
    job: str
    workdir: str
    store: str
    stages: list[StageOutcome]
    test: dict[str, Any]
    report: dict[str, Any]
    majority_baseline: float | None
    model: str | None

    def to_json(self) -> dict[str, Any]:
        return {**self._basics(), **run_summary(self.stages)}

    def _basics(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "workdir": self.workdir,
            "store": self.store,
            "stages": [
                {
                    "name": s.name,
                    "state": s.state,
                    "durationSeconds": round(s.duration_seconds, 2),
                    "metrics": s.metrics,
                    "checkpoint": s.checkpoint,
                }
                for s in self.stages
            ],
            "test": self.test,
            "majorityBaseline": self.majority_baseline,
            "report": self.report,
            "model": self.model,
        }


def run_summary(stages: list[StageOutcome]) -> dict[str, Any]:
    """What result.json adds for a sweep and co-training: `bestParams`, `tune` (trial counts
    and where the results are) and `pseudoLabels` (count, per class, accuracy)."""
    summary: dict[str, Any] = {}
    tune = next((s for s in stages if s.kind == StageName.TUNE), None)
    if tune is not None:
        summary["bestParams"] = tune.best_params
        summary["tune"] = {key: tune.metrics[key] for key in TUNE_SUMMARY if key in tune.metrics}
    classifier = next((s for s in stages if s.kind == StageName.CLASSIFIER), None)
    stats = pseudo_label_stats(classifier.metrics) if classifier is not None else None
    if stats is not None:
        summary["pseudoLabels"] = stats.to_wire()
    return summary


def stage_command(
    stage: PlannedStage, config_path: Path, nproc: int, python: str = sys.executable
) -> list[str]:
    """torchrun for a training stage; one plain process for tune (it starts Ray itself)."""
    entry = ["-m", "ulmfit_trainer", stage.kind.value, "--config", str(config_path)]
    if stage.kind == StageName.TUNE:
        return [python, *entry]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [python, *launcher, *entry]


def store_root_for(job: ULMFiTJob, workdir: Path) -> str:
    s3 = job.spec.storage.s3
    return s3.root if s3 is not None else str((workdir / "store").resolve())


class LocalRunner:
    def __init__(
        self,
        job: ULMFiTJob,
        workdir: Path,
        nproc: int = 2,
        console: Console | None = None,
        python: str = sys.executable,
    ):
        if nproc < 1:
            raise PermanentError(f"--nproc must be at least 1 (got {nproc})")
        self.job = job
        self.workdir = workdir.resolve()
        self.nproc = nproc
        self.console = console or Console()
        self.python = python
        self.store_root = store_root_for(job, self.workdir)
        self.plan: Plan = make_plan(job, self.store_root, job.spec.storage.s3)
        self.checkpoints = CheckpointStore(
            open_store(self.store_root, job.spec.storage.s3), job.run_id
        )

    def run(self) -> RunResult:
        for sub in ("configs", "logs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.preflight()
        outcomes = [self._run_stage(stage) for stage in self.plan.stages]
        evaluation = outcomes[-1]
        summary = parse_evaluation(evaluation.metrics)
        result = RunResult(
            job=self.job.run_id,
            workdir=str(self.workdir),
            store=self.store_root,
            stages=outcomes,
            test=evaluation.metrics,
            report=self._evaluation_report(),
            majority_baseline=summary.majority_baseline_accuracy if summary else None,
            model=evaluation.model_uri,
        )
        (self.workdir / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        return result

    def preflight(self) -> None:
        """Check the data against every stage still to run; `InvalidSpec` names each problem.
        Nothing is read when every stage has finished."""
        pending = [s.config for s in self.plan.stages if self.checkpoints.final(s.name) is None]
        if pending:
            check_stages(pending)

    def _evaluation_report(self) -> dict[str, Any]:
        """The evaluate stage's full report (per class, confusion matrix) from the store."""
        key = self.checkpoints.artifact_key(StageName.EVALUATE, EVALUATION_REPORT)
        try:
            return dict(json.loads(self.checkpoints.store.get_bytes(key)))
        except (StoreError, ValueError):
            return {}

    def _finished(self, stage: PlannedStage) -> StageOutcome | None:
        latest = self.checkpoints.final(stage.name)
        if latest is None:
            return None
        best = latest.meta.get("bestParams")
        return StageOutcome(
            name=stage.name,
            state="cached",
            duration_seconds=float(latest.meta.get("durationSeconds", 0.0)),
            metrics=dict(latest.meta.get("metrics", {})),
            checkpoint=latest.uri,
            model_uri=latest.meta.get("modelUri"),
            best_params=dict(best) if isinstance(best, dict) else None,
            kind=stage.kind.value,
        )

    def _run_stage(self, stage: PlannedStage) -> StageOutcome:
        cached = self._finished(stage)
        if cached is not None:
            self.console.print(
                f"[green]✓[/] {stage.name}: already finished, reusing {cached.checkpoint}"
            )
            return cached
        config_path = self.workdir / "configs" / f"{stage.name}.json"
        stage.config.write(config_path)
        log_path = self.workdir / "logs" / f"{stage.name}.log"
        nproc = self.nproc if stage.distributed else 1
        command = stage_command(stage, config_path, nproc, self.python)
        if stage.kind == StageName.TUNE:
            self.console.print(f"[bold]▶ {stage.name}[/] (Ray on the local cores)")
        else:
            self.console.print(
                f"[bold]▶ {stage.name}[/] ({nproc} process{'es' if nproc > 1 else ''})"
            )
        started, started_at = time.monotonic(), now_iso()
        returncode, tail, failure = self._supervise(
            command, stage.name, log_path, echo=stage.kind == StageName.TUNE
        )
        duration = time.monotonic() - started
        if returncode != 0:
            failure = failure or self._recorded_failure(stage.name, since=started_at)
            raise StageFailed(
                stage.name, returncode, log_path, tail,
                error=failure.error if failure else None,
                invalid=bool(failure and failure.invalid),
            )  # fmt: skip
        finished = self._finished(stage)
        if finished is None:
            raise StageFailed(
                stage.name,
                returncode,
                log_path,
                [*tail, "the stage exited 0 but committed no final checkpoint"],
            )
        finished.state, finished.duration_seconds = "succeeded", duration
        self.console.print(
            f"[green]✓[/] {stage.name} in {duration:.0f}s {_brief(finished.metrics)}"
        )
        return finished

    def _recorded_failure(self, stage: str, since: str) -> StageProgress | None:
        """The `failed` progress the trainer wrote to the store during this attempt, if any."""
        try:
            report = self.checkpoints.read_progress(stage)
        except StoreError:
            return None
        if report is None or report.state != "failed" or not report.error:
            return None
        return report if report.updated_at >= since else None  # not a stale one

    def _supervise(
        self, command: list[str], stage: str, log_path: Path, echo: bool = False
    ) -> tuple[int, list[str], StageProgress | None]:
        """Run ``command``, following its output: (exit status, log tail, the `failed` report
        it printed, if any)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        with log_path.open("a") as log, _progress_display(self.console) as progress:
            task = progress.add_task(stage, total=None, status="starting")
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,
                cwd=self.workdir,
            )
            try:
                assert process.stdout is not None
                failure = _follow(process.stdout, log, tail, progress, task, echo=echo)
                return process.wait(), list(tail), failure
            except KeyboardInterrupt:
                _stop(process)
                raise Interrupted(
                    f"stopped during {stage}; committed checkpoints are kept — "
                    "run the same command again to resume"
                ) from None
            finally:
                if process.poll() is None:
                    _stop(process)


def _follow(
    stream: IO[str],
    log: IO[str],
    tail: deque[str],
    progress: Progress,
    task: Any,
    echo: bool = False,
) -> StageProgress | None:
    """Progress lines move the bar (a `dashboard` URL in one is shown once); other lines go to
    the log, and with `echo` (the tune stage's trial table) to the console as well. Returns the
    first `failed` report with an error line (the failing rank's), if one came."""
    dashboard_shown = False
    failure: StageProgress | None = None
    for line in stream:
        report = parse_progress_line(line)
        if report is not None:
            if report.state == "failed" and report.error and failure is None:
                failure = report
                log.write(f"{report.stage} failed (rank {report.rank}): {report.error}\n")
            if report.dashboard and not dashboard_shown:
                progress.console.print(f"  Ray dashboard: {report.dashboard}", highlight=False)
                dashboard_shown = True
            _show(progress, task, report)
            continue
        log.write(line)
        tail.append(line.rstrip("\n"))
        if echo:
            progress.console.print(line.rstrip("\n"), markup=False, highlight=False)
    return failure


def _show(progress: Progress, task: Any, report: StageProgress) -> None:
    phase = report.phase
    label = report.stage + (f" {phase}" if phase not in (None, "") else "")
    loss = report.loss
    speed = report.tokens_per_second
    status = " ".join(
        part
        for part in (
            f"loss {loss:.3f}" if isinstance(loss, int | float) else "",
            f"{speed:,.0f} tok/s" if isinstance(speed, int | float) else "",
        )
        if part
    )
    progress.update(
        task,
        description=label,
        total=report.total_steps or None,
        completed=report.step,
        status=status,
    )


def _progress_display(console: Console) -> Progress:
    return Progress(
        TextColumn("  [bold blue]{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop the whole torchrun process group: SIGTERM, then SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _brief(metrics: dict[str, Any]) -> str:
    shown = [f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float)][:4]
    return f"[dim]({', '.join(shown)})[/]" if shown else ""


def result_table(result: RunResult) -> Table:
    table = Table(title=f"ULMFiTJob {result.job}")
    table.add_column("stage")
    table.add_column("state")
    table.add_column("time", justify="right")
    table.add_column("metrics")
    for stage in result.stages:
        table.add_row(
            stage.name,
            stage.state,
            f"{stage.duration_seconds:.0f}s",
            ", ".join(
                f"{k} {v:.4g}" for k, v in stage.metrics.items() if isinstance(v, int | float)
            ),
        )
    return table
