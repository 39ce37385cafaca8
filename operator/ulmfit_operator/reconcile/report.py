"""Step 10 of a reconcile: the status of a running job (each ready stage running, queued or
pending, the Running and Queued conditions, the ETA) and its per-stage gauges."""

from __future__ import annotations

from collections.abc import Mapping

from ulmfit_operator.api import StageState
from ulmfit_operator.decisions import Decision, StageGauges
from ulmfit_operator.reconcile.context import Context, current
from ulmfit_operator.stages import StageInfo, StageRun, format_eta, live_progress, progress_text
from ulmfit_operator.status import ConditionType, format_time, parse_time


def running(ctx: Context) -> Decision:
    infos = {name: running_info(ctx, name, run) for name, run in ctx.runs.items()}
    note_queue(ctx, infos)
    etas = [
        info.progress.eta_seconds
        for info in infos.values()
        if info.progress is not None and info.progress.eta_seconds is not None
    ]
    ctx.status.eta = format_eta(max(etas)) if etas else None
    ctx.write_stages(infos)
    ctx.status.current_stage = current(ctx.ready)
    ctx.status.progress = "; ".join(
        f"{name} queued"
        if infos[name].queued_since is not None
        else progress_text(name, infos[name].state, run.attempt, ctx.progress.get(name))
        for name, run in ctx.runs.items()
    )
    if len(ctx.ready) == 1:
        [only] = ctx.ready
        message = (
            f"stage {only.name} ({ctx.plan.names.index(only.name) + 1}/"
            f"{len(ctx.plan.stages)}), attempt {ctx.runs[only.name].attempt}"
        )
    else:
        message = f"stages {ctx.ready_names} at once ({len(ctx.done)}/{len(ctx.plan.stages)} done)"
    ctx.job.set_condition(ConditionType.RUNNING, True, "StageRunning", message)
    all_queued = all(info.queued_since is not None for info in infos.values())
    ctx.gauges = tuple(stage_gauges(ctx, name, info) for name, info in infos.items())
    return ctx.decide(
        "Pending" if all_queued else "Running", min(ctx.requeue) if ctx.requeue else None
    )


def stage_gauges(ctx: Context, name: str, info: StageInfo) -> StageGauges:
    live, queued = info.progress, parse_time(info.queued_since)
    return StageGauges(
        stage=name,
        attempts=info.attempt,
        progress=min(1.0, live.step / live.total_steps)
        if live is not None and live.total_steps
        else None,
        loss=live.loss if live is not None else None,
        tokens_per_second=live.tokens_per_second if live is not None else None,
        queued_seconds=max(0.0, (ctx.job.now - queued).total_seconds()) if queued else None,
    )


def running_info(ctx: Context, name: str, run: StageRun) -> StageInfo:
    """A ready stage's entry: running (with its last report), waiting for its queue, or
    pending."""
    waiting = run.waiting
    if waiting is not None:
        where = f"LocalQueue {ctx.queue}" if ctx.queue else "whoever suspended it"
        info = run.info(StageState.PENDING)
        info.message = f"attempt {waiting.attempt} waits to be admitted by {where}"
        old = ctx.job.old_stage(name)
        # Made suspended: queued since it was made; suspended again after it ran (a
        # queue took its quota back): since now.
        since = waiting.created if waiting.resumed is None else None
        info.queued_since = (old.queued_since if old is not None else None) or format_time(
            since or ctx.job.now
        )
        return info
    running = run.running
    if running is None:
        return run.info(StageState.PENDING)
    info = run.info(StageState.RUNNING)
    old = ctx.job.old_stage(name)
    info.progress = live_progress(
        old.progress if old is not None else None, ctx.progress.get(name), running
    )
    return info


def note_queue(ctx: Context, infos: Mapping[str, StageInfo]) -> None:
    """The Queued condition: True while an attempt waits for admission."""
    waiting = [name for name, info in infos.items() if info.queued_since is not None]
    if waiting:
        where = f"LocalQueue {ctx.queue}" if ctx.queue else "its queue"
        ctx.job.set_condition(
            ConditionType.QUEUED,
            True,
            "WaitingForAdmission",
            f"stage {', '.join(waiting)} waits to be admitted by {where}",
        )
    else:
        ctx.job.clear_condition(ConditionType.QUEUED, "Admitted", "no stage waits")
