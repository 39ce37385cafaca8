"""Step 9 of a reconcile: exactly one child per ready stage. A stage with no active attempt gets
its next one (the job's NetworkPolicy ahead of its first child, when the operator fences pods; a
tune stage also gets its dashboard Service)."""

from __future__ import annotations

from ulmfit_trainer.config import StageName, TuneBackend

from ulmfit_operator.children import (
    DASHBOARD_PORT,
    RAYJOB_CRD,
    Attempt,
    child_workload,
    dashboard_service,
    network_policy,
    stage_config_map,
    tune_backend,
)
from ulmfit_operator.decisions import CreateObject, Decision, DeleteChild, Event
from ulmfit_operator.plan import PlannedStage
from ulmfit_operator.policy import S3Endpoint
from ulmfit_operator.reconcile.context import Context
from ulmfit_operator.stages import StageRun, tune_status


def start_attempts(ctx: Context) -> Decision | None:
    for stage in ctx.ready:
        run = ctx.runs[stage.name]
        # Should an extra attempt exist, only the newest stays.
        if len(run.active) > 1:
            ctx.job.actions.extend(DeleteChild(c.ref) for c in run.active[:-1])
            run.active = run.active[-1:]
        if run.active or run.stopped_now:
            continue
        failed = start_attempt(ctx, stage, run)
        if failed is not None:
            return failed
    return None


def start_attempt(ctx: Context, stage: PlannedStage, run: StageRun) -> Decision | None:
    """Create the stage's next attempt (and a tune stage's dashboard Service)."""
    backend = TuneBackend.POD
    if stage.kind == StageName.TUNE:
        backend = tune_backend(stage, ctx.cluster.rayjob)
    if backend == TuneBackend.RAYJOB and not ctx.cluster.rayjob:
        return ctx.fail(
            {stage.name},
            "RayJobUnavailable",
            "spec.stages.tune.backend is rayjob, but the RayJob CRD "
            f"({RAYJOB_CRD}) was not installed when the operator started; install "
            "KubeRay and restart the operator, or use backend pod",
        )
    run.attempt += 1
    source = ctx.done.get(stage.init_from) if stage.init_from else None
    init = source.uri if source is not None else None
    attempt = Attempt(
        ctx.job.owner,
        stage,
        ctx.spec,
        run.attempt,
        init,
        training_runtime=ctx.cluster.training_runtime,
    )
    body = child_workload(attempt, backend, ctx.training)
    run.child = body["metadata"]["name"]
    config_map = stage_config_map(ctx.job.owner, run.child, stage, run.attempt)
    if ctx.network is not None and not ctx.job.children:
        # Before the job's first child (again after a crash in between: a 409 then), not at
        # every attempt: that would be one refused write per stage transition.
        port = S3Endpoint.of(ctx.s3).port or 0
        fence = network_policy(ctx.job.owner, port, ctx.network)
        ctx.job.actions.append(CreateObject(fence))
    ctx.job.actions.extend([CreateObject(config_map), CreateObject(body)])
    note = f", starting from {init}" if init else ""
    if run.failed:
        note += f" (retry {len(run.failed)} of {ctx.policy.backoff_limit})"
    if stage.kind == StageName.TUNE:
        note += start_dashboard(ctx, backend)
    ctx.job.events.append(
        Event(
            "Normal",
            "StageStarted",
            f"stage {stage.name} attempt {run.attempt}: created {body['kind']} {run.child}{note}",
        )
    )
    return None


def start_dashboard(ctx: Context, backend: TuneBackend) -> str:
    """The tune stage's dashboard Service and status.tune; returns where to find it."""
    ctx.job.actions.append(CreateObject(dashboard_service(ctx.job.owner)))
    tune = tune_status(ctx.job.owner, backend)
    ctx.status.tune = tune.model_copy(
        update={"best_params": ctx.status.tune.best_params if ctx.status.tune else None}
    )
    local = f"http://localhost:{DASHBOARD_PORT}"
    where = "" if tune.dashboard == local else f" at {tune.dashboard}"
    return f"; Ray dashboard{where}; to open it at {local}, run: {tune.port_forward}"
