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

Some 650 lines on purpose: the steps above are one method each of `_Job` (1-3) and `_Context`
(4-10), in this order, so the fixed order reads top to bottom in one file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from ulmfit_trainer.config import S3Settings, StageName, TuneBackend
from ulmfit_trainer.errors import InvalidSpec
from ulmfit_trainer.records import StageProgress, parse_evaluation

from ulmfit_operator.api import (
    Metadata,
    StageState,
    TrainingBackend,
    ULMFiTJob,
    ULMFiTJobSpec,
    parse_spec,
    queue_name,
)
from ulmfit_operator.children import (
    CONFIGMAP_KIND,
    DASHBOARD_PORT,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_STAGE,
    PYTORCHJOB_KIND,
    RAYJOB_CRD,
    RAYJOB_KIND,
    TRAINJOB_KIND,
    Attempt,
    Child,
    ChildPhase,
    Cluster,
    Owner,
    child_workload,
    dashboard_service,
    network_policy,
    stage_config_map,
    training_backend,
    trainjob_unsupported,
    tune_backend,
)
from ulmfit_operator.decisions import (
    Action,
    CreateObject,
    Decision,
    DeleteChild,
    DeleteJob,
    Event,
    StageGauges,
    StopChild,
)
from ulmfit_operator.observations import (
    FinalCheckpoint,
    NeedPods,
    NeedStore,
    Observation,
    final_checkpoint,
)
from ulmfit_operator.plan import TUNE_KEY, PlannedStage, make_plan
from ulmfit_operator.policy import UNBOUNDED, JobPolicy, PodNetwork, S3Endpoint
from ulmfit_operator.stages import (
    StageInfo,
    StageRun,
    done_entry,
    failure_detail,
    format_eta,
    live_progress,
    progress_text,
    recorded_final,
    silent_for,
    stage_entry,
    succeeded_events,
    trainer_error,
    tune_status,
)
from ulmfit_operator.status import (
    Condition,
    ConditionType,
    JobResult,
    StageStatus,
    condition_true,
    find_condition,
    format_time,
    parse_time,
    pseudo_label_stats,
    read_status,
    set_condition,
)

STOPPED_STALE = "ProgressDeadlineExceeded"
STOPPED_PENDING = "PendingDeadlineExceeded"
LM_STAGES = (StageName.PRETRAIN, StageName.FINETUNE)
"""Listed in status.stages even when disabled (as Skipped), ahead of the planned stages."""

DEFAULT_CLUSTER = Cluster()
"""PyTorchJobs served, no TrainJobs or RayJobs, backend `auto`."""

Answer = Decision | NeedStore | NeedPods
"""A decision, or a fact reconcile needs first (read it, add it to the observation, ask again)."""
_Step = Callable[[], Answer | None]


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
    seen = _Job(job, children, now)
    # 2. validate
    try:
        spec, s3 = _validated(job.get("spec") or {})
    except InvalidSpec as error:
        return seen.invalid(error)
    # 3. finished
    if seen.finished:
        return seen.after_finish(spec.run_policy.ttl_seconds_after_finished)
    # the policy, before the store is read or a child created
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
    # 4. to 10.
    return _Context(seen, spec, s3, observation, cluster, training, policy.pod_network).run()


def _created(child: Child) -> datetime:
    return child.created or datetime.min.replace(tzinfo=UTC)


def _validated(raw_spec: Mapping[str, Any]) -> tuple[ULMFiTJobSpec, S3Settings]:
    spec = parse_spec(raw_spec)
    if spec.storage.s3 is None:
        raise InvalidSpec(
            [("spec.storage.s3", None, "the operator needs an S3 store for checkpoints")]
        )
    return spec, spec.storage.s3


# -------------------------------------------------------------------------------------- the job


class _Job:
    """The job as one reconcile sees it (metadata, old status, its own children, the clock) and
    the decision taking shape: the new status, the actions and the events."""

    def __init__(self, job: Mapping[str, Any], children: Sequence[Child], now: datetime):
        meta = job.get("metadata") or {}
        self.name = str(meta.get("name"))
        self.labels: Mapping[str, str] = meta.get("labels") or {}
        self.namespace = str(meta.get("namespace") or "default")
        self.uid = str(meta.get("uid") or "")
        self.generation = int(meta["generation"]) if meta.get("generation") is not None else None
        self.created = parse_time(meta.get("creationTimestamp"))
        self.now = now
        self.owner = Owner.from_metadata(meta)
        raw_status = job.get("status")
        self.old = read_status(raw_status)
        # The old status as we would have written it (unknown fields dropped), to compare with.
        self.old_wire = self.old.to_wire() if isinstance(raw_status, dict) and raw_status else {}
        # Only our own children: a leftover with the same name from an earlier job of the same
        # name (another uid) is not ours to count or delete.
        self.children = [c for c in children if not self.uid or c.owner_uid == self.uid]
        self.status = self.old.model_copy(deep=True)
        self.actions: list[Action] = []
        self.events: list[Event] = []

    # -- reading what was seen

    @property
    def finished(self) -> bool:
        conditions = self.old.conditions
        return condition_true(conditions, ConditionType.SUCCEEDED) or condition_true(
            conditions, ConditionType.FAILED
        )

    def old_stage(self, name: str) -> StageStatus | None:
        return next((s for s in self.old.stages if s.name == name), None)

    # -- shaping the decision

    def delete_active(self) -> None:
        """Delete the active children, except those this decision stops: a stopped attempt
        stays as the record of why it failed."""
        stopping = {a.child for a in self.actions if isinstance(a, StopChild)}
        self.actions.extend(
            DeleteChild(child.ref)
            for child in self.children
            if child.active and child.ref not in stopping
        )

    def set_condition(self, kind: ConditionType, holds: bool, reason: str, message: str) -> None:
        condition = Condition(
            type=kind,
            status="True" if holds else "False",
            reason=reason,
            message=message,
            last_transition_time=format_time(self.now),
            observed_generation=self.generation,
        )
        self.status.conditions = set_condition(self.status.conditions, condition)

    def clear_condition(self, kind: ConditionType, reason: str, message: str) -> None:
        """Set `kind` to False, but only when it is there: absent conditions stay absent."""
        if find_condition(self.status.conditions, kind) is not None:
            self.set_condition(kind, False, reason, message)

    def decide(
        self,
        state: str,
        requeue_after: float | None = None,
        completed: Sequence[tuple[str, float]] = (),
        gauges: Sequence[StageGauges] = (),
    ) -> Decision:
        self.status.observed_generation = self.generation
        new = self.status.to_wire()
        return Decision(
            actions=tuple(self.actions),
            status=new if new != self.old_wire else None,
            events=tuple(self.events),
            requeue_after=requeue_after,
            state=state,
            completed_stages=tuple(completed),
            gauges=tuple(gauges),
        )

    # -- 2. invalid spec

    def invalid(self, error: InvalidSpec) -> Decision:
        message = str(error)
        previous = find_condition(self.status.conditions, ConditionType.FAILED)
        if previous is None or previous.status != "True" or previous.message != message:
            self.events.append(Event("Warning", "InvalidSpec", message))
        self.set_condition(ConditionType.FAILED, True, "InvalidSpec", message)
        self.clear_condition(ConditionType.RUNNING, "InvalidSpec", message)
        self.status.progress = "Failed: InvalidSpec"
        self.status.completion_time = self.status.completion_time or format_time(self.now)
        self.delete_active()
        return self.decide("Failed")

    # -- 3. finished jobs: clean up and wait for the TTL

    def after_finish(self, ttl: int | None) -> Decision:
        failed = condition_true(self.old.conditions, ConditionType.FAILED)
        if failed:
            self.delete_active()
        requeue = None
        if ttl is not None:
            finished_at = parse_time(self.old.completion_time) or self.now
            remaining = (finished_at + timedelta(seconds=ttl) - self.now).total_seconds()
            if remaining <= 0:
                self.actions.append(DeleteJob())
            else:
                requeue = remaining
        return self.decide("Failed" if failed else "Succeeded", requeue)


# ---------------------------------------------------------------------------------- the context


class _Context:
    """Steps 4 to 10 for a valid job that has not finished: the plan, the stages done, the ready
    stages and their attempts. The status, actions and events it decides go to `job`."""

    def __init__(
        self,
        job: _Job,
        spec: ULMFiTJobSpec,
        s3: S3Settings,
        observation: Observation,
        cluster: Cluster,
        training: TrainingBackend,
        network: PodNetwork | None,
    ):
        self.job = job
        self.spec = spec
        self.policy = spec.run_policy
        self.s3 = s3
        self.observation = observation
        self.cluster = cluster
        self.training = training
        """What the distributed stages run as (resolved: never `auto`)."""
        self.network = network
        """The NetworkPolicy each attempt makes sure of (None: the operator fences no pods)."""
        self.queue = queue_name(spec, job.labels)
        """The Kueue LocalQueue that admits the children (None: they start at once)."""
        self.plan = make_plan(
            ULMFiTJob.model_validate(
                {
                    "metadata": Metadata(name=job.name, namespace=job.namespace, uid=job.uid),
                    "spec": spec,
                }
            ),
            store_root=s3.root,
            s3=s3,
        )
        self.status = job.status
        self.done: dict[str, FinalCheckpoint] = {}
        self.ready: list[PlannedStage] = []
        self.runs: dict[str, StageRun] = {}
        """The attempts of each ready stage."""
        self.progress: dict[str, StageProgress | None] = {}
        """The progress of each ready stage with a running attempt."""
        self.requeue: list[float] = []
        """When a deadline falls due (seconds from now)."""
        self.completed: list[tuple[str, float]] = []
        """Stages finished since the old status, with their duration."""
        self.gauges: tuple[StageGauges, ...] = ()
        """The ready stages' numbers for the per-job metrics (set while the job runs)."""

    def run(self) -> Answer:
        """Steps 4 to 10 in order; a step that settles the reconcile returns its answer."""
        need = self.walk_plan()
        if need is not None:
            return need
        self.note_tune()
        if not self.ready:
            return self.succeeded()
        self.runs = {stage.name: StageRun.of(self.job.children, stage.name) for stage in self.ready}
        steps: tuple[_Step, ...] = (
            self.suspend_or_resume,
            self.active_deadline,
            self.explain_failures,
            self.backoff_limit,
            self.watch_progress,
            self.watch_pending,
            self.start_attempts,
        )
        for step in steps:
            answer = step()
            if answer is not None:
                return answer
        return self.running()

    @property
    def ready_names(self) -> str:
        return ", ".join(stage.name for stage in self.ready)

    # -- 4. walk the plan

    def walk_plan(self) -> NeedStore | None:
        """A stage whose dependencies are all done is either done (the status recorded its final
        checkpoint, or the store holds one under this job instance's run path) or ready.

        A brand-new job (no status, no children) skips the store: nothing has run under its
        run path, which carries its UID, so the read would find nothing (at scale, a third of a
        worker's time went to it). Should something be there after all (a status wiped by hand),
        the first attempt's trainer resumes from it or finds the stage finished, and the next
        reconcile, which has a child, reads the store again."""
        brand_new = not self.job.children and not self.job.old_wire
        for stage in self.plan.stages:
            if any(dep not in self.done for dep in stage.depends_on):
                continue
            recorded = recorded_final(self.job.old_stage(stage.name))
            if recorded is not None:
                self.done[stage.name] = recorded
                continue
            if brand_new:
                continue
            if stage.name not in self.observation.checkpoints:
                return NeedStore(stage.name, "checkpoint", self.plan.run, self.s3)
            final = self.observation.checkpoints[stage.name]
            if final is not None:
                self.done[stage.name] = final
        self.ready = self.plan.ready(self.done)
        return None

    def note_tune(self) -> None:
        """Record the sweep's best parameters once its final checkpoint has been read."""
        final = self.done.get(TUNE_KEY)
        if final is None or final.best_params is None or not self.plan.has(StageName.TUNE):
            return
        tune = self.status.tune or tune_status(
            self.job.owner,
            TuneBackend.RAYJOB
            if any(c.kind == RAYJOB_KIND for c in self.job.children if c.stage == TUNE_KEY)
            else TuneBackend.POD,
        )
        self.status.tune = tune.model_copy(update={"best_params": dict(final.best_params)})

    def succeeded(self) -> Decision:
        """No stage is ready: all are done."""
        self.write_stages({})
        evaluate = self.done.get(StageName.EVALUATE)
        classifier = self.done.get(StageName.CLASSIFIER)
        model_uri = (evaluate.model_uri if evaluate else None) or (
            classifier.uri if classifier else None
        )
        self.status.result = JobResult(
            model_uri=model_uri,
            test_metrics=dict(evaluate.metrics) if evaluate else {},
            best_params=self.status.tune.best_params if self.status.tune else None,
            pseudo_labels=pseudo_label_stats(classifier.metrics) if classifier else None,
        )
        self.status.current_stage = self.plan.stages[-1].name
        summary = f"all {len(self.plan.stages)} stages succeeded; model at {model_uri}"
        evaluation = parse_evaluation(dict(evaluate.metrics)) if evaluate else None
        if evaluation is not None:
            summary += (
                f"; test accuracy {evaluation.accuracy:.4f} "
                f"(majority baseline {evaluation.majority_baseline_accuracy:.4f})"
            )
        ended = evaluate.created_at if evaluate and evaluate.created_at else self.job.now
        return self.finish(ConditionType.SUCCEEDED, "Succeeded", summary, ended)

    # -- 5. suspend and resume

    def suspend_or_resume(self) -> Decision | None:
        suspended_before = condition_true(self.status.conditions, ConditionType.SUSPENDED)
        if self.policy.suspend:
            return self.suspend(announce=not suspended_before)
        if suspended_before:
            names = self.ready_names
            self.job.set_condition(
                ConditionType.SUSPENDED, False, "Resumed", f"resumed at stage {names}"
            )
            self.status.start_time = format_time(self.job.now)  # the active deadline restarts
            self.job.events.append(Event("Normal", "Resumed", f"job resumed at stage {names}"))
        return None

    def suspend(self, announce: bool) -> Decision:
        """Delete the running children; the checkpoints stay, so resuming goes on from them."""
        message = "suspended: running children deleted, checkpoints kept"
        self.job.delete_active()
        self.job.set_condition(ConditionType.SUSPENDED, True, "Suspended", message)
        self.job.clear_condition(ConditionType.RUNNING, "Suspended", message)
        self.status.current_stage = _current(self.ready)
        self.status.progress = "Suspended"
        self.status.eta = None
        self.job.clear_condition(ConditionType.QUEUED, "Suspended", message)
        self.write_stages(
            {name: run.info(StageState.PENDING, "suspended") for name, run in self.runs.items()}
        )
        if announce:
            self.job.events.append(
                Event("Normal", "Suspended", f"job suspended at stage {self.ready_names}")
            )
        return self.decide("Suspended")

    # -- 6. active deadline

    def active_deadline(self) -> Decision | None:
        """Counted from status.startTime (set here when the job first runs, reset on resume)."""
        start = parse_time(self.status.start_time) or self.job.created or self.job.now
        if self.status.start_time is None:
            self.status.start_time = format_time(start)
        limit = self.policy.active_deadline_seconds
        if limit is None:
            return None
        left = limit - (self.job.now - start).total_seconds()
        if left > 0:
            self.requeue.append(left)
            return None
        return self.fail(
            set(self.runs),
            "DeadlineExceeded",
            f"job was active longer than activeDeadlineSeconds={limit} "
            f"(at stage {self.ready_names})",
        )

    # -- 7. backoff limit, per stage

    def explain_failures(self) -> NeedStore | None:
        """The trainer's own error line for each stage's last failed attempt. Read from the
        store once, when the failure is new; the status entry keeps it after that (the next
        attempt's reports replace the store's copy)."""
        for name, run in self.runs.items():
            last = run.failed[-1] if run.failed else None
            if last is None or last.stopped or last.phase != ChildPhase.FAILED:
                continue
            old = self.job.old_stage(name)
            if old is not None and old.failures >= len(run.failed):
                run.trainer_error = old.last_error or ""
                continue
            if name not in self.observation.progress:
                return NeedStore(name, "progress", self.plan.run, self.s3)
            run.trainer_error = trainer_error(last, self.observation.progress[name])
        return None

    def backoff_limit(self) -> Decision | None:
        for name, run in self.runs.items():
            if len(run.failed) > self.policy.backoff_limit:
                last = run.failed[-1]
                return self.backoff_exceeded(
                    name, last.name, failure_detail(last, run.trainer_error)
                )
        return None

    def backoff_exceeded(self, name: str, attempt: str, detail: str) -> Decision:
        """Fail the job: stage `name` used up `backoffLimit`; `attempt` failed last (`detail`)."""
        message = (
            f"stage {name} failed {len(self.runs[name].failed)} times (backoffLimit "
            f"{self.policy.backoff_limit}); last attempt {attempt}: {detail}"
        )
        return self.fail({name}, "BackoffLimitExceeded", message)

    # -- 8. progress watchdog, per stage

    def watch_progress(self) -> Decision | NeedStore | None:
        """A running attempt that made no progress for progressDeadlineSeconds is stopped: a
        failed attempt, which may use up the backoff limit."""
        deadline = self.policy.progress_deadline_seconds
        for name, run in self.runs.items():
            running = run.running
            if running is None:
                continue
            if name not in self.observation.progress:
                return NeedStore(name, "progress", self.plan.run, self.s3)
            self.progress[name] = self.observation.progress[name]
            silent = silent_for(running, self.progress[name], self.job.now)
            if silent <= deadline:
                self.requeue.append(deadline - silent)
                continue
            self.stop_stalled(name, running, silent)
            if len(run.failed) > self.policy.backoff_limit:
                return self.backoff_exceeded(name, running.name, f"no progress for {int(silent)}s")
        return None

    def stop_stalled(self, name: str, child: Child, silent: float) -> None:
        self.job.actions.append(StopChild(child.ref, STOPPED_STALE, child.resource_version))
        self.job.events.append(
            Event(
                "Warning",
                STOPPED_STALE,
                f"stage {name} attempt {child.attempt} ({child.name}) made no progress for "
                f"{int(silent)}s (progressDeadlineSeconds {self.policy.progress_deadline_seconds}"
                "); stopping it, the next attempt resumes from the latest checkpoint",
            )
        )
        self.runs[name].stop(child)

    # -- 8b. pending deadline, per stage

    def watch_pending(self) -> NeedPods | Decision | None:
        """An attempt whose pods have not started pendingDeadlineSeconds after it could (made,
        or admitted by its queue) is stopped with its pods' own reasons: a failed attempt."""
        deadline = self.policy.pending_deadline_seconds
        if deadline is None:
            return None
        for name, run in self.runs.items():
            child = run.active[-1] if run.active else None
            if child is None or child.phase != ChildPhase.PENDING:
                continue
            since = self.pending_since(child)
            if since is None:
                continue
            waited = (self.job.now - since).total_seconds()
            if waited <= deadline:
                self.requeue.append(deadline - waited)
                continue
            if child.name not in self.observation.pods:
                selector = (
                    f"{LABEL_JOB}={self.job.name},{LABEL_STAGE}={name},"
                    f"{LABEL_ATTEMPT}={child.attempt}"
                )
                return NeedPods(child.name, child.namespace, selector)
            why = self.observation.pods[child.name] or "its pods did not start"
            self.stop_pending(name, child, waited, why)
            if len(run.failed) > self.policy.backoff_limit:
                return self.backoff_exceeded(name, child.name, f"{STOPPED_PENDING}: {why}")
        return None

    def pending_since(self, child: Child) -> datetime | None:
        """When the attempt could start: admitted by its queue, else made. A queued attempt
        whose admission time nobody has written yet is not timed (queue time never counts)."""
        if child.resumed is not None:
            return child.resumed
        if self.queue is not None:
            return child.started
        return child.created

    def stop_pending(self, name: str, child: Child, waited: float, why: str) -> None:
        reason = f"{STOPPED_PENDING}: {why}"
        self.job.actions.append(StopChild(child.ref, reason[:1000], child.resource_version))
        self.job.events.append(
            Event(
                "Warning",
                STOPPED_PENDING,
                f"stage {name} attempt {child.attempt} ({child.name}) did not start in "
                f"{int(waited)}s (pendingDeadlineSeconds {self.policy.pending_deadline_seconds})"
                f": {why}",
            )
        )
        self.runs[name].stop(child)

    # -- 9. exactly one child per ready stage

    def start_attempts(self) -> Decision | None:
        for stage in self.ready:
            run = self.runs[stage.name]
            # Should an extra attempt exist, only the newest stays.
            if len(run.active) > 1:
                self.job.actions.extend(DeleteChild(c.ref) for c in run.active[:-1])
                run.active = run.active[-1:]
            if run.active or run.stopped_now:
                continue
            failed = self.start_attempt(stage, run)
            if failed is not None:
                return failed
        return None

    def start_attempt(self, stage: PlannedStage, run: StageRun) -> Decision | None:
        """Create the stage's next attempt (and a tune stage's dashboard Service)."""
        backend = TuneBackend.POD
        if stage.kind == StageName.TUNE:
            backend = tune_backend(stage, self.cluster.rayjob)
        if backend == TuneBackend.RAYJOB and not self.cluster.rayjob:
            return self.fail(
                {stage.name},
                "RayJobUnavailable",
                "spec.stages.tune.backend is rayjob, but the RayJob CRD "
                f"({RAYJOB_CRD}) was not installed when the operator started; install "
                "KubeRay and restart the operator, or use backend pod",
            )
        run.attempt += 1
        source = self.done.get(stage.init_from) if stage.init_from else None
        init = source.uri if source is not None else None
        attempt = Attempt(
            self.job.owner,
            stage,
            self.spec,
            run.attempt,
            init,
            training_runtime=self.cluster.training_runtime,
        )
        body = child_workload(attempt, backend, self.training)
        run.child = body["metadata"]["name"]
        config_map = stage_config_map(self.job.owner, run.child, stage, run.attempt)
        if self.network is not None and not self.job.children:
            # Before the job's first child (again after a crash in between: a 409 then), not at
            # every attempt: that would be one refused write per stage transition.
            port = S3Endpoint.of(self.s3).port or 0
            fence = network_policy(self.job.owner, port, self.network)
            self.job.actions.append(CreateObject(fence))
        self.job.actions.extend([CreateObject(config_map), CreateObject(body)])
        note = f", starting from {init}" if init else ""
        if run.failed:
            note += f" (retry {len(run.failed)} of {self.policy.backoff_limit})"
        if stage.kind == StageName.TUNE:
            note += self.start_dashboard(backend)
        self.job.events.append(
            Event(
                "Normal",
                "StageStarted",
                f"stage {stage.name} attempt {run.attempt}: created {body['kind']} "
                f"{run.child}{note}",
            )
        )
        return None

    def start_dashboard(self, backend: TuneBackend) -> str:
        """The tune stage's dashboard Service and status.tune; returns where to find it."""
        self.job.actions.append(CreateObject(dashboard_service(self.job.owner)))
        tune = tune_status(self.job.owner, backend)
        self.status.tune = tune.model_copy(
            update={"best_params": self.status.tune.best_params if self.status.tune else None}
        )
        local = f"http://localhost:{DASHBOARD_PORT}"
        where = "" if tune.dashboard == local else f" at {tune.dashboard}"
        return f"; Ray dashboard{where}; to open it at {local}, run: {tune.port_forward}"

    # -- 10. status and events

    def running(self) -> Decision:
        infos = {name: self.running_info(name, run) for name, run in self.runs.items()}
        self.note_queue(infos)
        etas = [
            info.progress.eta_seconds
            for info in infos.values()
            if info.progress is not None and info.progress.eta_seconds is not None
        ]
        self.status.eta = format_eta(max(etas)) if etas else None
        self.write_stages(infos)
        self.status.current_stage = _current(self.ready)
        self.status.progress = "; ".join(
            f"{name} queued"
            if infos[name].queued_since is not None
            else progress_text(name, infos[name].state, run.attempt, self.progress.get(name))
            for name, run in self.runs.items()
        )
        if len(self.ready) == 1:
            [only] = self.ready
            message = (
                f"stage {only.name} ({self.plan.names.index(only.name) + 1}/"
                f"{len(self.plan.stages)}), attempt {self.runs[only.name].attempt}"
            )
        else:
            message = (
                f"stages {self.ready_names} at once ({len(self.done)}/{len(self.plan.stages)} done)"
            )
        self.job.set_condition(ConditionType.RUNNING, True, "StageRunning", message)
        all_queued = all(info.queued_since is not None for info in infos.values())
        self.gauges = tuple(self.stage_gauges(name, info) for name, info in infos.items())
        return self.decide(
            "Pending" if all_queued else "Running", min(self.requeue) if self.requeue else None
        )

    def stage_gauges(self, name: str, info: StageInfo) -> StageGauges:
        live, queued = info.progress, parse_time(info.queued_since)
        return StageGauges(
            stage=name,
            attempts=info.attempt,
            progress=min(1.0, live.step / live.total_steps)
            if live is not None and live.total_steps
            else None,
            loss=live.loss if live is not None else None,
            tokens_per_second=live.tokens_per_second if live is not None else None,
            queued_seconds=max(0.0, (self.job.now - queued).total_seconds()) if queued else None,
        )

    def running_info(self, name: str, run: StageRun) -> StageInfo:
        """A ready stage's entry: running (with its last report), waiting for its queue, or
        pending."""
        waiting = run.waiting
        if waiting is not None:
            where = f"LocalQueue {self.queue}" if self.queue else "whoever suspended it"
            info = run.info(StageState.PENDING)
            info.message = f"attempt {waiting.attempt} waits to be admitted by {where}"
            old = self.job.old_stage(name)
            # Made suspended: queued since it was made; suspended again after it ran (a
            # queue took its quota back): since now.
            since = waiting.created if waiting.resumed is None else None
            info.queued_since = (old.queued_since if old is not None else None) or format_time(
                since or self.job.now
            )
            return info
        running = run.running
        if running is None:
            return run.info(StageState.PENDING)
        info = run.info(StageState.RUNNING)
        old = self.job.old_stage(name)
        info.progress = live_progress(
            old.progress if old is not None else None, self.progress.get(name), running
        )
        return info

    def note_queue(self, infos: Mapping[str, StageInfo]) -> None:
        """The Queued condition: True while an attempt waits for admission."""
        waiting = [name for name, info in infos.items() if info.queued_since is not None]
        if waiting:
            where = f"LocalQueue {self.queue}" if self.queue else "its queue"
            self.job.set_condition(
                ConditionType.QUEUED,
                True,
                "WaitingForAdmission",
                f"stage {', '.join(waiting)} waits to be admitted by {where}",
            )
        else:
            self.job.clear_condition(ConditionType.QUEUED, "Admitted", "no stage waits")

    def fail(self, failing: set[str], reason: str, message: str) -> Decision:
        """Fail the job: the `failing` stages are Failed (with `message`), the other ready
        stages Pending."""
        self.write_stages(
            {
                name: run.info(StageState.FAILED, message)
                if name in failing
                else run.info(StageState.PENDING)
                for name, run in self.runs.items()
            }
        )
        self.status.current_stage = ", ".join(name for name in self.runs if name in failing)
        return self.finish(ConditionType.FAILED, reason, message)

    def finish(
        self,
        outcome: Literal[ConditionType.SUCCEEDED, ConditionType.FAILED],
        reason: str,
        message: str,
        ended_at: datetime | None = None,
    ) -> Decision:
        """The job's end: the summary condition, Running cleared, the TTL clock started."""
        failed = outcome == ConditionType.FAILED
        self.status.progress = f"Failed: {reason}" if failed else "Succeeded"
        self.status.eta = None
        self.job.clear_condition(ConditionType.QUEUED, reason, message)
        self.status.completion_time = self.status.completion_time or format_time(
            ended_at or self.job.now
        )
        self.job.set_condition(outcome, True, reason, message)
        self.job.clear_condition(ConditionType.RUNNING, reason, message)
        if failed:
            self.job.delete_active()
        self.job.events.append(Event("Warning" if failed else "Normal", reason, message))
        ttl = self.policy.ttl_seconds_after_finished
        return self.decide(
            "Failed" if failed else "Succeeded", float(ttl) if ttl is not None else None
        )

    def decide(self, state: str, requeue_after: float | None = None) -> Decision:
        """The decision, with a StageSucceeded event ahead of the others for each stage that
        succeeded since the old status."""
        self.job.events = [*succeeded_events(self.job.old, self.status), *self.job.events]
        return self.job.decide(state, requeue_after, self.completed, self.gauges)

    # -- status.stages

    def write_stages(self, infos: Mapping[str, StageInfo]) -> None:
        """One entry per stage (disabled LM stages as Skipped); notes newly finished stages."""
        planned = set(self.plan.names)
        entries = [
            (index, StageStatus(name=lm, kind=lm, state=StageState.SKIPPED))
            for index, lm in enumerate(LM_STAGES)
            if lm.value not in planned
        ]
        for position, stage in enumerate(self.plan.stages):
            order = LM_STAGES.index(stage.kind) if stage.kind in LM_STAGES else 2 + position
            old = self.job.old_stage(stage.name)
            final = self.done.get(stage.name)
            if final is None:
                entry = stage_entry(old, stage, infos.get(stage.name), self.job.now)
            else:
                entry, took = done_entry(old, stage, final, self.job.children, self.job.now)
                if took is not None:
                    self.completed.append((stage.kind.value, took))
            entries.append((order, entry))
        self.status.stages = [entry for _, entry in sorted(entries, key=lambda item: item[0])]


def _current(ready: Sequence[PlannedStage]) -> str:
    return ",".join(stage.name for stage in ready)


__all__ = [
    "CONFIGMAP_KIND",
    "Action",
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
