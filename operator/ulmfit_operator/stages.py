"""Pure: one stage of a job as reconcile sees it: its attempts, its status entry, its progress.

Each attempt of a stage is one child workload. `StageRun` sorts a ready stage's children into
failed and active ones (a child that reports success without a final checkpoint in the store
counts as failed). The helpers below read a running attempt's `progress.json` (`StageProgress`)
for the progress watchdog and `status.progress`, and build a stage's `status.stages[]` entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from ulmfit_trainer.config import TuneBackend
from ulmfit_trainer.records import StageProgress

from ulmfit_operator.api import StageState
from ulmfit_operator.children import Child, ChildPhase
from ulmfit_operator.decisions import Event
from ulmfit_operator.observations import FinalCheckpoint
from ulmfit_operator.plan import PlannedStage
from ulmfit_operator.status import (
    StageStatus,
    TuneStatus,
    ULMFiTJobStatus,
    format_time,
    parse_time,
)
from ulmfit_operator.workloads import (
    DASHBOARD_PORT,
    Owner,
    dashboard_address,
    dashboard_service_name,
)


@dataclass
class StageInfo:
    """What status.stages[] says about a stage that is ready (running or about to)."""

    state: StageState
    attempt: int
    failures: int
    child: str | None
    message: str


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
            message = last_failure(self.failed)
        return StageInfo(state, self.attempt, len(self.failed), self.child, message)


def last_failure(failed: Sequence[Child]) -> str:
    """Why the last failed attempt failed, for the stage's status entry."""
    if not failed:
        return ""
    last = failed[-1]
    if last.stopped:
        return f"attempt {last.attempt} stopped: {last.stopped}"
    if last.phase == ChildPhase.SUCCEEDED:
        return f"attempt {last.attempt} ended without a final checkpoint in the store"
    return f"attempt {last.attempt} failed" + (f": {last.message}" if last.message else "")


def failure_detail(child: Child) -> str:
    """Why a failed attempt failed, for the BackoffLimitExceeded message."""
    if child.message:
        return child.message
    if child.stopped:
        return f"stopped: {child.stopped}"
    if child.phase == ChildPhase.SUCCEEDED:
        return "succeeded without a final checkpoint in the store"
    return "failed"


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
    "last_failure",
    "progress_text",
    "progress_time",
    "recorded_final",
    "silent_for",
    "stage_entry",
    "succeeded_events",
    "tune_status",
]
