"""Pure: one stage of a job as reconcile sees it: its attempts, its status entry, its progress.

Each attempt of a stage is one child workload. `StageRun` sorts a ready stage's children into
failed and active ones (a child that reports success without a final checkpoint in the store
counts as failed). The helpers below read a running attempt's `progress.json` (`StageProgress`)
for the progress watchdog and `status.progress`, and build a stage's `status.stages[]` entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ulmfit_trainer.config import TuneBackend
from ulmfit_trainer.records import StageProgress

from ulmfit_operator.api import StageState
from ulmfit_operator.children import (
    DASHBOARD_PORT,
    Child,
    ChildPhase,
    Owner,
    dashboard_address,
    dashboard_service_name,
)
from ulmfit_operator.decisions import Event
from ulmfit_operator.observations import FinalCheckpoint
from ulmfit_operator.plan import PlannedStage
from ulmfit_operator.status import (
    LiveProgress,
    StageStatus,
    TuneStatus,
    ULMFiTJobStatus,
    format_time,
    parse_time,
)


@dataclass
class StageInfo:
    """What status.stages[] says about a stage that is ready (running or about to)."""

    state: StageState
    attempt: int
    failures: int
    child: str | None
    message: str
    last_error: str = ""
    progress: LiveProgress | None = None
    queued_since: str | None = None


@dataclass
class StageRun:
    """The attempts of one ready stage, as one reconcile sees and changes them."""

    latest: Child | None = None
    failed: list[Child] = field(default_factory=list)
    active: list[Child] = field(default_factory=list)
    attempt: int = 0
    child: str | None = None
    stopped_now: bool = False
    """The watchdog stopped an attempt in this reconcile: the next starts on the next one."""
    trainer_error: str = ""
    """The error line the trainer reported for the last failed attempt (its `progress.json`)."""

    @classmethod
    def of(cls, children: Sequence[Child], stage: str) -> StageRun:
        """The stage's children. Only called for a stage with no final checkpoint in the store,
        so a child that reports success did not really finish: it counts as failed."""
        mine = sorted((c for c in children if c.stage == stage), key=lambda c: c.attempt)
        latest = mine[-1] if mine else None
        return cls(
            latest=latest,
            failed=[
                c
                for c in mine
                if c.stopped is not None or c.phase in (ChildPhase.FAILED, ChildPhase.SUCCEEDED)
            ],
            active=[c for c in mine if c.active],
            attempt=latest.attempt if latest else 0,
            child=latest.name if latest else None,
        )

    @property
    def running(self) -> Child | None:
        """The newest active attempt that runs (the one the watchdog watches)."""
        return next((c for c in reversed(self.active) if c.phase == ChildPhase.RUNNING), None)

    def stop(self, child: Child) -> None:
        """`child` was stopped in this reconcile: it is a failed attempt now."""
        self.active = [c for c in self.active if c is not child]
        self.failed = [*self.failed, child]
        self.stopped_now = True

    def info(self, state: StageState, message: str | None = None) -> StageInfo:
        """The stage's status entry; `message` defaults to why the last attempt failed."""
        if message is None:
            message = last_failure(self.failed, self.trainer_error)
        return StageInfo(
            state, self.attempt, len(self.failed), self.child, message, self.trainer_error
        )

    @property
    def waiting(self) -> Child | None:
        """The newest attempt, when a queue holds it suspended."""
        newest = self.active[-1] if self.active else None
        return newest if newest is not None and newest.waiting else None


def last_failure(failed: Sequence[Child], trainer_error: str = "") -> str:
    """Why the last failed attempt failed, for the stage's status entry."""
    if not failed:
        return ""
    last = failed[-1]
    if last.stopped:
        return f"attempt {last.attempt} stopped: {last.stopped}"
    if last.phase == ChildPhase.SUCCEEDED:
        return f"attempt {last.attempt} ended without a final checkpoint in the store"
    detail = _why_failed(last, trainer_error)
    return f"attempt {last.attempt} failed" + (f": {detail}" if detail else "")


def failure_detail(child: Child, trainer_error: str = "") -> str:
    """Why a failed attempt failed: the trainer's own error line first, when it reported one,
    then what the child's controller says."""
    if child.stopped:
        return f"stopped: {child.stopped}"
    if child.phase == ChildPhase.SUCCEEDED:
        return "succeeded without a final checkpoint in the store"
    return _why_failed(child, trainer_error) or "failed"


def _why_failed(child: Child, trainer_error: str) -> str:
    if trainer_error and child.message:
        return f"{trainer_error} ({child.message})"
    return trainer_error or child.message


def trainer_error(child: Child, progress: StageProgress | None) -> str:
    """The error line of a failed attempt's `progress.json`, if that report is the attempt's."""
    if progress is None or progress.state != "failed" or not progress.error:
        return ""
    return progress.error if progress_time(progress, child.created) is not None else ""


def progress_time(progress: StageProgress | None, since: datetime | None) -> datetime | None:
    """When the trainer last reported, if that was during this attempt (made at `since`)."""
    if progress is None:
        return None
    updated = parse_time(progress.updated_at)
    if updated is None or (since is not None and updated < since):
        return None
    return updated


def silent_for(child: Child, progress: StageProgress | None, now: datetime) -> float:
    """Seconds since a running attempt last showed life: made, started, or reported progress."""
    signs = [
        t
        for t in (child.created, child.started, progress_time(progress, child.created))
        if t is not None
    ]
    return (now - max(signs)).total_seconds() if signs else 0.0


def progress_text(
    stage: str, state: StageState, attempt: int, progress: StageProgress | None
) -> str:
    """`classifier phase 2/4, 63%`; `finetune 40%`; `classifier pending (attempt 2)`."""
    retry = f" (attempt {attempt})" if attempt > 1 else ""
    if state != StageState.RUNNING or progress is None or progress.stage != stage:
        return f"{stage} {'running' if state == StageState.RUNNING else 'pending'}{retry}"
    parts = []
    if progress.phase is not None and progress.phase != "":
        total = f"/{progress.total_phases}" if progress.total_phases else ""
        parts.append(f"phase {progress.phase}{total}")
    if progress.total_steps:
        parts.append(f"{min(100, int(100 * progress.step / progress.total_steps))}%")
    return (f"{stage} " + ", ".join(parts) if parts else f"{stage} running") + retry


def live_progress(
    old: LiveProgress | None, progress: StageProgress | None, child: Child
) -> LiveProgress | None:
    """The running attempt's last report for its status entry. The ETA comes from the pace
    between the report the old status holds and this one; the same report again keeps the old
    ETA (reconciles come more often than reports)."""
    if progress is None or progress_time(progress, child.created) is None:
        return None
    eta = None
    if progress.total_steps and old is not None:
        if old.updated_at == progress.updated_at and old.step == progress.step:
            eta = old.eta_seconds
        else:
            then, now = parse_time(old.updated_at), parse_time(progress.updated_at)
            steps = progress.step - old.step
            if then is not None and now is not None and now > then and steps > 0:
                seconds_per_step = (now - then).total_seconds() / steps
                eta = round(max(0, progress.total_steps - progress.step) * seconds_per_step)
    return LiveProgress(
        step=max(0, progress.step),
        total_steps=progress.total_steps,
        loss=progress.loss,
        tokens_per_second=progress.tokens_per_second,
        eta_seconds=eta,
        updated_at=format_time(parse_time(progress.updated_at) or child.created or _EPOCH),
    )


def format_eta(seconds: int) -> str:
    """`45s`, `12m30s`, `3h05m`: short enough for a `kubectl get` column."""
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# ------------------------------------------------------------------------------ status.stages


def recorded_final(old: StageStatus | None) -> FinalCheckpoint | None:
    """A stage's final checkpoint as the old status recorded it (no store read needed)."""
    if old is None or old.state != StageState.SUCCEEDED or not old.checkpoint:
        return None
    return FinalCheckpoint(
        uri=old.checkpoint, created_at=parse_time(old.completion_time), metrics=dict(old.metrics)
    )


def stage_entry(
    old: StageStatus | None, stage: PlannedStage, info: StageInfo | None, now: datetime
) -> StageStatus:
    """The entry of a stage that is not done: from `info` when it is ready, else Pending."""
    if info is None or old is None:
        entry = StageStatus(name=stage.name, kind=stage.kind, state=StageState.PENDING)
    else:
        entry = old.model_copy(deep=True)
        entry.kind = stage.kind
    if info is None:
        return entry
    entry.state = info.state
    entry.failures = info.failures
    entry.attempts = info.attempt or entry.attempts
    entry.child = info.child or entry.child
    entry.message = info.message or None
    entry.last_error = info.last_error or None
    entry.progress = info.progress
    entry.queued_since = info.queued_since
    if entry.start_time is None and info.attempt:
        entry.start_time = format_time(now)
    entry.completion_time = None
    return entry


def done_entry(
    old: StageStatus | None,
    stage: PlannedStage,
    final: FinalCheckpoint,
    children: Sequence[Child],
    now: datetime,
) -> tuple[StageStatus, float | None]:
    """The entry of a done stage, and its duration in seconds when it finished since `old`."""
    entry = StageStatus(name=stage.name, kind=stage.kind, state=StageState.SUCCEEDED)
    if old is not None:
        entry = old.model_copy(deep=True)
        entry.kind = stage.kind
    entry.state = StageState.SUCCEEDED
    entry.checkpoint = final.uri
    entry.metrics = dict(final.metrics)
    entry.message = None
    entry.progress = None
    entry.queued_since = None
    finished_at = final.created_at or now
    entry.completion_time = entry.completion_time or format_time(finished_at)
    mine = [c for c in children if c.stage == stage.name]
    if mine:
        latest = max(mine, key=lambda c: c.attempt)
        entry.attempts = max(entry.attempts, latest.attempt)
        entry.child = entry.child or latest.name
        failures = sum(1 for c in mine if c.stopped or c.phase == ChildPhase.FAILED)
        entry.failures = max(entry.failures, failures)
    started = parse_time(entry.start_time)
    if (old is not None and old.state == StageState.SUCCEEDED) or started is None:
        return entry, None
    return entry, max(0.0, (finished_at - started).total_seconds())


def tune_status(owner: Owner, backend: TuneBackend) -> TuneStatus:
    """Where to watch a tune stage's sweep (its dashboard Service). The backend `pod` serves the
    dashboard on its loopback only, so a port-forward is the one way in."""
    dashboard, port_forward = dashboard_address(owner.name, owner.namespace)
    rayjob = backend == TuneBackend.RAYJOB
    return TuneStatus(
        backend="rayjob" if rayjob else "pod",
        service=dashboard_service_name(owner.name),
        dashboard=dashboard if rayjob else f"http://localhost:{DASHBOARD_PORT}",
        port_forward=port_forward,
    )


def succeeded_events(old: ULMFiTJobStatus, new: ULMFiTJobStatus) -> list[Event]:
    """A StageSucceeded event for each stage that succeeded since the old status."""
    before = {s.name: s.state for s in reversed(old.stages)}  # the first entry of a name wins
    events = []
    for entry in new.stages:
        if entry.state == StageState.SUCCEEDED and before.get(entry.name) != StageState.SUCCEEDED:
            metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(entry.metrics.items()))
            events.append(
                Event(
                    "Normal",
                    "StageSucceeded",
                    f"stage {entry.name} succeeded: checkpoint {entry.checkpoint}"
                    + (f" ({metrics})" if metrics else ""),
                )
            )
    return events


__all__ = [
    "StageInfo",
    "StageRun",
    "done_entry",
    "failure_detail",
    "format_eta",
    "last_failure",
    "live_progress",
    "progress_text",
    "progress_time",
    "recorded_final",
    "silent_for",
    "stage_entry",
    "succeeded_events",
    "trainer_error",
    "tune_status",
]
