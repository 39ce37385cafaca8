"""Steps 5 to 8 of a reconcile, the guards before any attempt starts: suspend and resume (5), the
active deadline (6), the backoff limit per stage with the trainer's error line (7), the progress
watchdog and the pending deadline per stage (8). Each returns a decision (or a fact it needs
first) when it settles the reconcile, else None."""

from __future__ import annotations

from datetime import datetime

from ulmfit_operator.api import StageState
from ulmfit_operator.children import LABEL_ATTEMPT, LABEL_JOB, LABEL_STAGE, Child, ChildPhase
from ulmfit_operator.decisions import Decision, Event, StopChild
from ulmfit_operator.observations import NeedPods, NeedStore
from ulmfit_operator.reconcile.context import Context, current
from ulmfit_operator.stages import failure_detail, silent_for, trainer_error
from ulmfit_operator.status import ConditionType, condition_true, format_time, parse_time

STOPPED_STALE = "ProgressDeadlineExceeded"
STOPPED_PENDING = "PendingDeadlineExceeded"


# -- 5. suspend and resume


def suspend_or_resume(ctx: Context) -> Decision | None:
    suspended_before = condition_true(ctx.status.conditions, ConditionType.SUSPENDED)
    if ctx.policy.suspend:
        return suspend(ctx, announce=not suspended_before)
    if suspended_before:
        names = ctx.ready_names
        ctx.job.set_condition(
            ConditionType.SUSPENDED, False, "Resumed", f"resumed at stage {names}"
        )
        ctx.status.start_time = format_time(ctx.job.now)  # the active deadline restarts
        ctx.job.events.append(Event("Normal", "Resumed", f"job resumed at stage {names}"))
    return None


def suspend(ctx: Context, announce: bool) -> Decision:
    """Delete the running children; the checkpoints stay, so resuming goes on from them."""
    message = "suspended: running children deleted, checkpoints kept"
    ctx.job.delete_active()
    ctx.job.set_condition(ConditionType.SUSPENDED, True, "Suspended", message)
    ctx.job.clear_condition(ConditionType.RUNNING, "Suspended", message)
    ctx.status.current_stage = current(ctx.ready)
    ctx.status.progress = "Suspended"
    ctx.status.eta = None
    ctx.job.clear_condition(ConditionType.QUEUED, "Suspended", message)
    ctx.write_stages(
        {name: run.info(StageState.PENDING, "suspended") for name, run in ctx.runs.items()}
    )
    if announce:
        ctx.job.events.append(
            Event("Normal", "Suspended", f"job suspended at stage {ctx.ready_names}")
        )
    return ctx.decide("Suspended")


# -- 6. active deadline


def active_deadline(ctx: Context) -> Decision | None:
    """Counted from status.startTime (set here when the job first runs, reset on resume)."""
    start = parse_time(ctx.status.start_time) or ctx.job.created or ctx.job.now
    if ctx.status.start_time is None:
        ctx.status.start_time = format_time(start)
    limit = ctx.policy.active_deadline_seconds
    if limit is None:
        return None
    left = limit - (ctx.job.now - start).total_seconds()
    if left > 0:
        ctx.requeue.append(left)
        return None
    return ctx.fail(
        set(ctx.runs),
        "DeadlineExceeded",
        f"job was active longer than activeDeadlineSeconds={limit} (at stage {ctx.ready_names})",
    )


# -- 7. backoff limit, per stage


def explain_failures(ctx: Context) -> NeedStore | None:
    """The trainer's own error line for each stage's last failed attempt. Read from the
    store once, when the failure is new; the status entry keeps it after that (the next
    attempt's reports replace the store's copy)."""
    for name, run in ctx.runs.items():
        last = run.failed[-1] if run.failed else None
        if last is None or last.stopped or last.phase != ChildPhase.FAILED:
            continue
        old = ctx.job.old_stage(name)
        if old is not None and old.failures >= len(run.failed):
            run.trainer_error = old.last_error or ""
            continue
        if name not in ctx.observation.progress:
            return NeedStore(name, "progress", ctx.plan.run, ctx.s3)
        run.trainer_error = trainer_error(last, ctx.observation.progress[name])
    return None


def backoff_limit(ctx: Context) -> Decision | None:
    for name, run in ctx.runs.items():
        if len(run.failed) > ctx.policy.backoff_limit:
            last = run.failed[-1]
            return backoff_exceeded(ctx, name, last.name, failure_detail(last, run.trainer_error))
    return None


def backoff_exceeded(ctx: Context, name: str, attempt: str, detail: str) -> Decision:
    """Fail the job: stage `name` used up `backoffLimit`; `attempt` failed last (`detail`)."""
    message = (
        f"stage {name} failed {len(ctx.runs[name].failed)} times (backoffLimit "
        f"{ctx.policy.backoff_limit}); last attempt {attempt}: {detail}"
    )
    return ctx.fail({name}, "BackoffLimitExceeded", message)


# -- 8. progress watchdog, per stage


def watch_progress(ctx: Context) -> Decision | NeedStore | None:
    """A running attempt that made no progress for progressDeadlineSeconds is stopped: a
    failed attempt, which may use up the backoff limit."""
    deadline = ctx.policy.progress_deadline_seconds
    for name, run in ctx.runs.items():
        running = run.running
        if running is None:
            continue
        if name not in ctx.observation.progress:
            return NeedStore(name, "progress", ctx.plan.run, ctx.s3)
        ctx.progress[name] = ctx.observation.progress[name]
        silent = silent_for(running, ctx.progress[name], ctx.job.now)
        if silent <= deadline:
            ctx.requeue.append(deadline - silent)
            continue
        stop_stalled(ctx, name, running, silent)
        if len(run.failed) > ctx.policy.backoff_limit:
            return backoff_exceeded(ctx, name, running.name, f"no progress for {int(silent)}s")
    return None


def stop_stalled(ctx: Context, name: str, child: Child, silent: float) -> None:
    ctx.job.actions.append(StopChild(child.ref, STOPPED_STALE, child.resource_version))
    ctx.job.events.append(
        Event(
            "Warning",
            STOPPED_STALE,
            f"stage {name} attempt {child.attempt} ({child.name}) made no progress for "
            f"{int(silent)}s (progressDeadlineSeconds {ctx.policy.progress_deadline_seconds}"
            "); stopping it, the next attempt resumes from the latest checkpoint",
        )
    )
    ctx.runs[name].stop(child)


# -- 8b. pending deadline, per stage


def watch_pending(ctx: Context) -> NeedPods | Decision | None:
    """An attempt whose pods have not started pendingDeadlineSeconds after it could (made,
    or admitted by its queue) is stopped with its pods' own reasons: a failed attempt."""
    deadline = ctx.policy.pending_deadline_seconds
    if deadline is None:
        return None
    for name, run in ctx.runs.items():
        child = run.active[-1] if run.active else None
        if child is None or child.phase != ChildPhase.PENDING:
            continue
        since = pending_since(ctx, child)
        if since is None:
            continue
        waited = (ctx.job.now - since).total_seconds()
        if waited <= deadline:
            ctx.requeue.append(deadline - waited)
            continue
        if child.name not in ctx.observation.pods:
            selector = (
                f"{LABEL_JOB}={ctx.job.name},{LABEL_STAGE}={name},{LABEL_ATTEMPT}={child.attempt}"
            )
            return NeedPods(child.name, child.namespace, selector)
        why = ctx.observation.pods[child.name] or "its pods did not start"
        stop_pending(ctx, name, child, waited, why)
        if len(run.failed) > ctx.policy.backoff_limit:
            return backoff_exceeded(ctx, name, child.name, f"{STOPPED_PENDING}: {why}")
    return None


def pending_since(ctx: Context, child: Child) -> datetime | None:
    """When the attempt could start: admitted by its queue, else made. A queued attempt
    whose admission time nobody has written yet is not timed (queue time never counts)."""
    if child.resumed is not None:
        return child.resumed
    if ctx.queue is not None:
        return child.started
    return child.created


def stop_pending(ctx: Context, name: str, child: Child, waited: float, why: str) -> None:
    reason = f"{STOPPED_PENDING}: {why}"
    ctx.job.actions.append(StopChild(child.ref, reason[:1000], child.resource_version))
    ctx.job.events.append(
        Event(
            "Warning",
            STOPPED_PENDING,
            f"stage {name} attempt {child.attempt} ({child.name}) did not start in "
            f"{int(waited)}s (pendingDeadlineSeconds {ctx.policy.pending_deadline_seconds})"
            f": {why}",
        )
    )
    ctx.runs[name].stop(child)
