"""Step 4 of a reconcile: walk the plan (a DAG). A stage is done once the status recorded its
final checkpoint or the store holds one under this job instance's run path; the ready stages are
those not done whose dependencies all are; none ready: the job succeeded."""

from __future__ import annotations

from ulmfit_trainer.config import StageName, TuneBackend
from ulmfit_trainer.records import parse_evaluation

from ulmfit_operator.children import RAYJOB_KIND
from ulmfit_operator.decisions import Decision
from ulmfit_operator.observations import NeedStore
from ulmfit_operator.plan import TUNE_KEY
from ulmfit_operator.reconcile.context import Context
from ulmfit_operator.stages import recorded_final, tune_status
from ulmfit_operator.status import ConditionType, JobResult, pseudo_label_stats


def walk_plan(ctx: Context) -> NeedStore | None:
    """A stage whose dependencies are all done is either done (the status recorded its final
    checkpoint, or the store holds one under this job instance's run path) or ready.

    A brand-new job (no status, no children) skips the store: nothing has run under its
    run path, which carries its UID, so the read would find nothing (at scale, a third of a
    worker's time went to it). Should something be there after all (a status wiped by hand),
    the first attempt's trainer resumes from it or finds the stage finished, and the next
    reconcile, which has a child, reads the store again."""
    brand_new = not ctx.job.children and not ctx.job.old_wire
    for stage in ctx.plan.stages:
        if any(dep not in ctx.done for dep in stage.depends_on):
            continue
        recorded = recorded_final(ctx.job.old_stage(stage.name))
        if recorded is not None:
            ctx.done[stage.name] = recorded
            continue
        if brand_new:
            continue
        if stage.name not in ctx.observation.checkpoints:
            return NeedStore(stage.name, "checkpoint", ctx.plan.run, ctx.s3)
        final = ctx.observation.checkpoints[stage.name]
        if final is not None:
            ctx.done[stage.name] = final
    ctx.ready = ctx.plan.ready(ctx.done)
    return None


def note_tune(ctx: Context) -> None:
    """Record the sweep's best parameters once its final checkpoint has been read."""
    final = ctx.done.get(TUNE_KEY)
    if final is None or final.best_params is None or not ctx.plan.has(StageName.TUNE):
        return
    tune = ctx.status.tune or tune_status(
        ctx.job.owner,
        TuneBackend.RAYJOB
        if any(c.kind == RAYJOB_KIND for c in ctx.job.children if c.stage == TUNE_KEY)
        else TuneBackend.POD,
    )
    ctx.status.tune = tune.model_copy(update={"best_params": dict(final.best_params)})


def succeeded(ctx: Context) -> Decision:
    """No stage is ready: all are done."""
    ctx.write_stages({})
    evaluate = ctx.done.get(StageName.EVALUATE)
    classifier = ctx.done.get(StageName.CLASSIFIER)
    model_uri = (evaluate.model_uri if evaluate else None) or (
        classifier.uri if classifier else None
    )
    ctx.status.result = JobResult(
        model_uri=model_uri,
        test_metrics=dict(evaluate.metrics) if evaluate else {},
        best_params=ctx.status.tune.best_params if ctx.status.tune else None,
        pseudo_labels=pseudo_label_stats(classifier.metrics) if classifier else None,
    )
    ctx.status.current_stage = ctx.plan.stages[-1].name
    summary = f"all {len(ctx.plan.stages)} stages succeeded; model at {model_uri}"
    evaluation = parse_evaluation(dict(evaluate.metrics)) if evaluate else None
    if evaluation is not None:
        summary += (
            f"; test accuracy {evaluation.accuracy:.4f} "
            f"(majority baseline {evaluation.majority_baseline_accuracy:.4f})"
        )
    ended = evaluate.created_at if evaluate and evaluate.created_at else ctx.job.now
    return ctx.finish(ConditionType.SUCCEEDED, "Succeeded", summary, ended)
