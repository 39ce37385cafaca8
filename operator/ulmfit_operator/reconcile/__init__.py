"""Pure: what the operator should do about one ULMFiTJob, given what it observes.

`reconcile(job, children, observation, now, cluster=..., policy=...)` reads the job object
(spec, metadata, the status cache), the children found in the cluster, what the store says
(final checkpoints and `progress.json` per stage), the workload APIs the cluster serves
(`Cluster`: TrainJob, PyTorchJob, RayJob, and the default training backend) and what the
operator's settings allow a job (`JobPolicy`: S3 endpoints, trainer images), and returns a
`Decision`: children to create, stop or delete, the new status (None when nothing changed) and
events. No I/O happens here; when it
needs a store fact it has not been given, it returns `NeedStore(stage, what)` and the caller
reads it and asks again (so the store is read only as far as the decision needs); likewise
`NeedPods` for why an attempt's pods have not started, asked only once its deadline passed.

The fixed order, as in Kubeflow's controllers:

1. a job being deleted is left alone;
2. validate the spec (`InvalidSpec`: Failed condition, Warning event, no children, no retry);
3. a finished job only waits for its TTL (then it is deleted);
   then the policy: a job whose store endpoint or trainer image the operator does not allow is
   an `InvalidSpec` too, before the store is read or any child is created (checked after 3, so
   a job that finished under an earlier policy keeps its outcome); so is one whose training
   backend the cluster does not serve, or that asks a TrainJob for what it cannot express;
4. walk the plan (a DAG): a stage is done once the store holds its final checkpoint under this
   job instance's run path (`<namespace>/<name>/<uid>`: a job re-created under the same name
   sees none of the earlier one's); the ready stages are those not done whose dependencies all are
   (the K co-trained models of a round are ready together); none ready: Succeeded;
5. suspend (delete running children, keep checkpoints) and resume;
6. active deadline;
7. backoff limit (failed attempts of each ready stage, counted per stage; the trainer's error
   line of a new failure is read from the store once, and kept in the status);
8. progress watchdog, per ready stage (a running attempt whose progress is stale is stopped:
   a failed attempt), then the pending deadline (an attempt whose pods have not started
   pendingDeadlineSeconds after it was made, or admitted by its queue, is stopped with its
   pods' own reasons). An attempt a queue (Kueue) holds suspended waits: it is neither failed
   nor timed, and no other attempt starts beside it;
9. exactly one child per ready stage: create its next attempt when none is active (the job's
   NetworkPolicy ahead of its first child, when the operator fences pods; a tune stage also gets
   its dashboard Service);
10. status and events, from the difference between the old status and the new one.

Everything derives from the cluster and the store; the status only remembers what is expensive
to look up again (finished stages' checkpoints) and times, so losing it loses nothing that
matters.

What reconcile reads lives in `observations`, what it returns in `decisions` (both re-exported
here), and what it works out per stage (attempts, progress, status entries) in `stages`.

`reconcile` below runs the steps in this order; each group of steps is a module of this package,
and reads top to bottom in the same order: `job` (1-3, with `SeenJob`, the decision taking
shape), `plan_walk` (4), `guards` (5-8), `attempts` (9), `report` (10). What steps 4 to 10 share
(the plan, the ready stages and their attempts, how a reconcile ends) is `context.Context`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.errors import InvalidSpec

from ulmfit_operator.api import TrainingBackend, ULMFiTJobSpec, parse_spec
from ulmfit_operator.children import (
    CONFIGMAP_KIND,
    PYTORCHJOB_KIND,
    TRAINJOB_KIND,
    Child,
    Cluster,
    training_backend,
    trainjob_unsupported,
)
from ulmfit_operator.decisions import (
    Action,
    CreateObject,
    Decision,
    DeleteChild,
    DeleteJob,
    Event,
    StopChild,
)
from ulmfit_operator.observations import (
    FinalCheckpoint,
    NeedPods,
    NeedStore,
    Observation,
    final_checkpoint,
)
from ulmfit_operator.policy import UNBOUNDED, JobPolicy
from ulmfit_operator.reconcile import attempts, guards, plan_walk, report
from ulmfit_operator.reconcile.context import Context
from ulmfit_operator.reconcile.job import SeenJob
from ulmfit_operator.stages import StageRun
from ulmfit_operator.status import pseudo_label_stats

DEFAULT_CLUSTER = Cluster()
"""PyTorchJobs served, no TrainJobs or RayJobs, backend `auto`."""

Answer = Decision | NeedStore | NeedPods
"""A decision, or a fact reconcile needs first (read it, add it to the observation, ask again)."""
_Step = Callable[[Context], Answer | None]

GUARDS_AND_ATTEMPTS: tuple[_Step, ...] = (
    guards.suspend_or_resume,  # 5
    guards.active_deadline,  # 6
    guards.explain_failures,  # 7
    guards.backoff_limit,
    guards.watch_progress,  # 8
    guards.watch_pending,
    attempts.start_attempts,  # 9
)
"""Steps 5 to 9, in order; the first that settles the reconcile gives its answer."""


def reconcile(
    job: Mapping[str, Any],
    children: Sequence[Child],
    observation: Observation,
    now: datetime,
    *,
    cluster: Cluster = DEFAULT_CLUSTER,
    policy: JobPolicy = UNBOUNDED,
) -> Answer:
    """Decide; see the module docstring for the order of the steps.

    `cluster`: the workload APIs served (a distributed stage on backend `auto` runs as a TrainJob
    where Kubeflow Trainer v2 is installed, a tune stage on `auto` as a RayJob where KubeRay is)
    and the operator's default training backend. `policy`: the S3 endpoints and trainer images a
    job may name (the default bounds neither; the operator passes its settings')."""
    # 1. a job being deleted is left alone
    if (job.get("metadata") or {}).get("deletionTimestamp"):
        return Decision(state="Deleting")
    seen = SeenJob(job, children, now)
    # 2. validate
    try:
        spec, s3 = _validated(job.get("spec") or {})
    except InvalidSpec as error:
        return seen.invalid(error)
    # 3. finished
    if seen.finished:
        return seen.after_finish(spec.run_policy.ttl_seconds_after_finished)
    # the policy and the training backend, before the store is read or a child created
    problems = policy.problems(s3, spec.resources.image)
    distributed = [c for c in seen.children if c.kind in (TRAINJOB_KIND, PYTORCHJOB_KIND)]
    started_on = max(distributed, key=_created).kind if distributed else None
    training, missing = training_backend(spec.resources.training_backend, cluster, started_on)
    if missing is not None:
        problems.append(missing)
    elif training == TrainingBackend.TRAINJOB:
        problems.extend(trainjob_unsupported(spec))
    if problems:
        return seen.invalid(InvalidSpec(problems))
    ctx = Context(seen, spec, s3, observation, cluster, training, policy.pod_network)
    # 4. walk the plan
    need = plan_walk.walk_plan(ctx)
    if need is not None:
        return need
    plan_walk.note_tune(ctx)
    if not ctx.ready:
        return plan_walk.succeeded(ctx)
    ctx.runs = {stage.name: StageRun.of(seen.children, stage.name) for stage in ctx.ready}
    # 5. to 9.
    for step in GUARDS_AND_ATTEMPTS:
        answer = step(ctx)
        if answer is not None:
            return answer
    # 10. status and events
    return report.running(ctx)


def _created(child: Child) -> datetime:
    return child.created or datetime.min.replace(tzinfo=UTC)


def _validated(raw_spec: Mapping[str, Any]) -> tuple[ULMFiTJobSpec, S3Settings]:
    spec = parse_spec(raw_spec)
    if spec.storage.s3 is None:
        raise InvalidSpec(
            [("spec.storage.s3", None, "the operator needs an S3 store for checkpoints")]
        )
    return spec, spec.storage.s3


__all__ = [
    "CONFIGMAP_KIND",
    "DEFAULT_CLUSTER",
    "Action",
    "Answer",
    "CreateObject",
    "Decision",
    "DeleteChild",
    "DeleteJob",
    "Event",
    "FinalCheckpoint",
    "NeedPods",
    "NeedStore",
    "Observation",
    "StopChild",
    "final_checkpoint",
    "pseudo_label_stats",
    "reconcile",
]
