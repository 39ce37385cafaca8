"""Pure: what the operator should do about one ULMFiTJob, given what it observes.

`reconcile(job, children, observation, now, rayjob_available=...)` reads the job object (spec,
metadata, the status cache), the children found in the cluster and what the store says (final
checkpoints and `progress.json` per stage), and returns a `Decision`: children to create, stop
or delete, the new status (None when nothing changed) and events. No I/O happens here; when it
needs a store fact it has not been given, it returns `NeedStore(stage, what)` and the caller
reads it and asks again (so the store is read only as far as the decision needs).

The fixed order, as in Kubeflow's controllers:

1. a job being deleted is left alone;
2. validate the spec (`InvalidSpec`: Failed condition, Warning event, no children, no retry);
3. a finished job only waits for its TTL (then it is deleted);
4. walk the plan (a DAG): a stage is done once the store holds its final checkpoint (made
   after the job was created); the ready stages are those not done whose dependencies all are
   (the K co-trained models of a round are ready together); none ready: Succeeded;
5. suspend (delete running children, keep checkpoints) and resume;
6. active deadline;
7. backoff limit (failed attempts of each ready stage, counted per stage);
8. progress watchdog, per ready stage (a running attempt whose progress is stale is stopped:
   a failed attempt);
9. exactly one child per ready stage: create its next attempt when none is active (a tune
   stage also gets its dashboard Service);
10. status and events, from the difference between the old status and the new one.

Everything derives from the cluster and the store; the status only remembers what is expensive
to look up again (finished stages' checkpoints) and times, so losing it loses nothing that
matters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from ulmfit_trainer.config import S3Settings, StageName, TuneBackend
from ulmfit_trainer.errors import InvalidSpec

from ulmfit_operator.api import Metadata, StageState, ULMFiTJob, ULMFiTJobSpec, parse_spec
from ulmfit_operator.plan import TUNE_KEY, Plan, PlannedStage, make_plan
from ulmfit_operator.status import (
    ConditionType,
    JobResult,
    StageStatus,
    TuneStatus,
    ULMFiTJobStatus,
    clear_condition,
    condition_true,
    find_condition,
    format_time,
    parse_time,
    pseudo_label_stats,
    read_status,
    set_condition,
)
from ulmfit_operator.workloads import (
    CONFIGMAP_KIND,
    DASHBOARD_PORT,
    RAYJOB_CRD,
    RAYJOB_KIND,
    Child,
    ChildPhase,
    ChildRef,
    Owner,
    dashboard_address,
    dashboard_service,
    dashboard_service_name,
    stage_child,
    stage_config_map,
    tune_backend,
)

EVENT_MESSAGE_LIMIT = 1000
"""Kubernetes caps event messages at 1024 bytes; stay under it with room for an ellipsis."""

STOPPED_STALE = "ProgressDeadlineExceeded"


# --------------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class FinalCheckpoint:
    """A stage's committed final checkpoint, as the store holds it."""

    uri: str
    created_at: datetime | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    model_uri: str | None = None
    """Where the stage exported a model, when it says so in its meta (`modelUri`)."""
    best_params: Mapping[str, float] | None = None
    """A tune stage's best hyperparameters (its meta's `bestParams`)."""


@dataclass(frozen=True)
class Observation:
    """Store facts read so far, per stage name; a stage missing from a map was not read."""

    checkpoints: Mapping[str, FinalCheckpoint | None] = field(default_factory=dict)
    progress: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)

    def with_checkpoint(self, stage: str, value: FinalCheckpoint | None) -> Observation:
        return Observation({**self.checkpoints, stage: value}, self.progress)

    def with_progress(self, stage: str, value: Mapping[str, Any] | None) -> Observation:
        return Observation(self.checkpoints, {**self.progress, stage: value})


@dataclass(frozen=True)
class NeedStore:
    """Reconcile needs a store fact: read it, add it to the observation, call again."""

    stage: str
    what: Literal["checkpoint", "progress"]
    run: str
    """`<namespace>/<job>`: where the job's objects live in the store."""
    s3: S3Settings | None


# -------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class CreateObject:
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])


@dataclass(frozen=True)
class DeleteChild:
    child: ChildRef


@dataclass(frozen=True)
class StopChild:
    """Suspend a child and mark it failed (its pods go, the object stays as the record)."""

    child: ChildRef
    reason: str
    resource_version: str = ""


@dataclass(frozen=True)
class DeleteJob:
    """The job's TTL after finishing has passed: delete it (children follow by ownership)."""


Action = CreateObject | DeleteChild | StopChild | DeleteJob


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str

    def __post_init__(self) -> None:
        if len(self.message) > EVENT_MESSAGE_LIMIT:
            object.__setattr__(self, "message", self.message[: EVENT_MESSAGE_LIMIT - 3] + "...")


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...] = ()
    status: dict[str, Any] | None = None
    """The whole new status when it differs from the old one; None: leave it alone."""
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None
    """Look again after this many seconds (a deadline or TTL falls due), besides the resync."""
    state: str = "Pending"
    """Summary for metrics: Pending, Running, Suspended, Succeeded, Failed."""
    completed_stages: tuple[tuple[str, float], ...] = ()
    """Stages that finished in this decision, with their duration in seconds."""


# ------------------------------------------------------------------------------------ reconcile


def reconcile(
    job: Mapping[str, Any],
    children: Sequence[Child],
    observation: Observation,
    now: datetime,
    *,
    rayjob_available: bool = False,
) -> Decision | NeedStore:
    """Decide; see the module docstring for the order of the checks.

    `rayjob_available`: the RayJob CRD is installed (a tune stage with backend `auto` then runs
    as a KubeRay RayJob)."""
    meta = job.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Decision(state="Deleting")
    ctx = _Context(job, children, now)

    # 2. validate
    try:
        spec, s3 = _validated(job.get("spec") or {})
    except InvalidSpec as error:
        return ctx.invalid(error)
    ctx.s3 = s3
    plan = make_plan(
        ULMFiTJob.model_validate(
            {"metadata": Metadata(name=ctx.name, namespace=ctx.namespace), "spec": spec}
        ),
        store_root=s3.root,
        s3=s3,
    )

    # 3. finished
    if ctx.finished:
        return ctx.after_finish(spec)

    # 4. walk the plan: a stage whose dependencies are all done is either done or ready
    done: dict[str, FinalCheckpoint] = {}
    for stage in plan.stages:
        if any(dep not in done for dep in stage.depends_on):
            continue
        cached = ctx.old_stage(stage.name)
        if cached is not None and cached.state == StageState.SUCCEEDED and cached.checkpoint:
            done[stage.name] = FinalCheckpoint(
                uri=cached.checkpoint,
                created_at=parse_time(cached.completion_time),
                metrics=dict(cached.metrics),
            )
            continue
        if stage.name not in observation.checkpoints:
            return NeedStore(stage.name, "checkpoint", plan.run, s3)
        final = observation.checkpoints[stage.name]
        if final is not None and ctx.fresh(final):
            done[stage.name] = final
    ready = plan.ready(done)
    if not ready:
        return ctx.succeeded(plan, spec, done)
    return ctx.run_stages(plan, spec, ready, done, observation, rayjob_available)


def _validated(raw_spec: Mapping[str, Any]) -> tuple[ULMFiTJobSpec, S3Settings]:
    spec = parse_spec(raw_spec)
    if spec.storage.s3 is None:
        raise InvalidSpec(
            [("spec.storage.s3", None, "the operator needs an S3 store for checkpoints")]
        )
    return spec, spec.storage.s3


# ---------------------------------------------------------------------------------- the context


class _Context:
    """One reconcile's inputs and the status being built."""

    def __init__(self, job: Mapping[str, Any], children: Sequence[Child], now: datetime):
        meta = job.get("metadata") or {}
        self.name = str(meta.get("name"))
        self.namespace = str(meta.get("namespace") or "default")
        self.uid = str(meta.get("uid") or "")
        self.generation = int(meta["generation"]) if meta.get("generation") is not None else None
        self.created = parse_time(meta.get("creationTimestamp"))
        self.now = now
        self.owner = Owner(self.name, self.namespace, self.uid)
        self.raw_status = job.get("status") if isinstance(job.get("status"), dict) else {}
        self.old = read_status(self.raw_status)
        # Only our own children: a leftover with the same name from an earlier job of the same
        # name (another uid) is not ours to count or delete.
        self.children = [c for c in children if not self.uid or c.owner_uid == self.uid]
        self.s3: S3Settings | None = None

    # -- reading the old status

    @property
    def finished(self) -> bool:
        conditions = self.old.conditions
        return condition_true(conditions, ConditionType.SUCCEEDED) or condition_true(
            conditions, ConditionType.FAILED
        )

    def old_stage(self, name: str) -> StageStatus | None:
        return next((s for s in self.old.stages if s.name == name), None)

    def fresh(self, final: FinalCheckpoint) -> bool:
        """Made by this job, not left in the store by an earlier job with the same name."""
        if final.created_at is None or self.created is None:
            return True
        return final.created_at >= self.created

    def active_children(self) -> list[Child]:
        return [c for c in self.children if c.active]

    # -- assembling the decision

    def decide(
        self,
        status: ULMFiTJobStatus,
        *,
        actions: Sequence[Action] = (),
        events: Sequence[Event] = (),
        requeue_after: float | None = None,
        state: str,
        completed: Sequence[tuple[str, float]] = (),
    ) -> Decision:
        status.observed_generation = self.generation
        new = status.to_wire()
        changed = new != self._comparable_old()
        return Decision(
            actions=tuple(actions),
            status=new if changed else None,
            events=tuple(events),
            requeue_after=requeue_after,
            state=state,
            completed_stages=tuple(completed),
        )

    def _comparable_old(self) -> dict[str, Any]:
        """The old status as we would have written it (unknown fields dropped)."""
        return self.old.to_wire() if self.raw_status else {}

    def delete_active(self, only: Sequence[Child] | None = None) -> list[Action]:
        targets = self.active_children() if only is None else only
        return [DeleteChild(child.ref) for child in targets]

    # -- 2. invalid spec

    def invalid(self, error: InvalidSpec) -> Decision:
        status = self.old.model_copy(deep=True)
        message = str(error)
        previous = find_condition(status.conditions, ConditionType.FAILED)
        events: list[Event] = []
        if previous is None or previous.status != "True" or previous.message != message:
            events.append(Event("Warning", "InvalidSpec", message))
        status.conditions = set_condition(
            status.conditions,
            ConditionType.FAILED,
            True,
            "InvalidSpec",
            message,
            self.now,
            self.generation,
        )
        status.conditions = clear_condition(
            status.conditions,
            ConditionType.RUNNING,
            "InvalidSpec",
            message,
            self.now,
            self.generation,
        )
        status.progress = "Failed: InvalidSpec"
        status.completion_time = status.completion_time or format_time(self.now)
        return self.decide(status, actions=self.delete_active(), events=events, state="Failed")

    # -- 3. finished jobs: clean up and wait for the TTL

    def after_finish(self, spec: ULMFiTJobSpec) -> Decision:
        actions: list[Action] = []
        if condition_true(self.old.conditions, ConditionType.FAILED):
            actions.extend(self.delete_active())
            state = "Failed"
        else:
            state = "Succeeded"
        ttl = spec.run_policy.ttl_seconds_after_finished
        requeue = None
        if ttl is not None:
            finished_at = parse_time(self.old.completion_time) or self.now
            remaining = (finished_at + timedelta(seconds=ttl) - self.now).total_seconds()
            if remaining <= 0:
                actions.append(DeleteJob())
            else:
                requeue = remaining
        status = self.old.model_copy(deep=True)
        return self.decide(status, actions=actions, requeue_after=requeue, state=state)

    # -- 4. all stages done

    def succeeded(
        self, plan: Plan, spec: ULMFiTJobSpec, done: Mapping[str, FinalCheckpoint]
    ) -> Decision:
        status = self.old.model_copy(deep=True)
        stages, completed = self.stage_statuses(plan, done, {})
        status.stages = stages
        self.note_tune(status, plan, done)
        evaluate = done.get(StageName.EVALUATE)
        classifier = done.get(StageName.CLASSIFIER)
        model_uri = (evaluate.model_uri if evaluate else None) or (
            classifier.uri if classifier else None
        )
        status.result = JobResult(
            model_uri=model_uri,
            test_metrics=dict(evaluate.metrics) if evaluate else {},
            best_params=status.tune.best_params if status.tune else None,
            pseudo_labels=pseudo_label_stats(classifier.metrics) if classifier else None,
        )
        status.current_stage = plan.stages[-1].name
        ended = evaluate.created_at if evaluate and evaluate.created_at else self.now
        accuracy = status.result.test_metrics.get("accuracy")
        summary = f"all {len(plan.stages)} stages succeeded; model at {model_uri}"
        if accuracy is not None:
            summary += f"; test accuracy {accuracy:.4f}"
            baseline = status.result.test_metrics.get("majorityBaseline")
            if baseline is not None:
                summary += f" (majority baseline {baseline:.4f})"
        return self.finish(
            status,
            spec,
            ConditionType.SUCCEEDED,
            "Succeeded",
            summary,
            ended_at=ended,
            completed=completed,
        )

    def finish(
        self,
        status: ULMFiTJobStatus,
        spec: ULMFiTJobSpec,
        outcome: Literal[ConditionType.SUCCEEDED, ConditionType.FAILED],
        reason: str,
        message: str,
        *,
        ended_at: datetime | None = None,
        events: Sequence[Event] = (),
        actions: Sequence[Action] = (),
        completed: Sequence[tuple[str, float]] = (),
    ) -> Decision:
        """The job's end: the summary condition, Running cleared, the TTL clock started."""
        failed = outcome == ConditionType.FAILED
        status.progress = f"Failed: {reason}" if failed else "Succeeded"
        status.completion_time = status.completion_time or format_time(ended_at or self.now)
        status.conditions = set_condition(
            status.conditions, outcome, True, reason, message, self.now, self.generation
        )
        status.conditions = clear_condition(
            status.conditions, ConditionType.RUNNING, reason, message, self.now, self.generation
        )
        ttl = spec.run_policy.ttl_seconds_after_finished
        return self.decide(
            status,
            actions=[*actions, *self.delete_active()] if failed else actions,
            events=[
                *self.stage_events(status),
                *events,
                Event("Warning" if failed else "Normal", reason, message),
            ],
            requeue_after=float(ttl) if ttl is not None else None,
            state="Failed" if failed else "Succeeded",
            completed=completed,
        )

    # -- 5..10. the ready stages

    def run_stages(
        self,
        plan: Plan,
        spec: ULMFiTJobSpec,
        ready: Sequence[PlannedStage],
        done: Mapping[str, FinalCheckpoint],
        observation: Observation,
        rayjob_available: bool,
    ) -> Decision | NeedStore:
        policy = spec.run_policy
        status = self.old.model_copy(deep=True)
        self.note_tune(status, plan, done)
        runs = {stage.name: self.attempts_of(stage) for stage in ready}
        names = ", ".join(stage.name for stage in ready)
        actions: list[Action] = []
        events: list[Event] = []
        requeue: list[float] = []
        suspended_before = condition_true(status.conditions, ConditionType.SUSPENDED)

        # 5. suspend / resume
        if policy.suspend:
            actions.extend(self.delete_active())
            message = "suspended: running children deleted, checkpoints kept"
            status.conditions = set_condition(
                status.conditions,
                ConditionType.SUSPENDED,
                True,
                "Suspended",
                message,
                self.now,
                self.generation,
            )
            status.conditions = clear_condition(
                status.conditions,
                ConditionType.RUNNING,
                "Suspended",
                message,
                self.now,
                self.generation,
            )
            status.current_stage = _current(ready)
            status.progress = "Suspended"
            infos = {
                name: run.info(StageState.PENDING, message="suspended")
                for name, run in runs.items()
            }
            status.stages, completed = self.stage_statuses(plan, done, infos)
            if not suspended_before:
                events.append(Event("Normal", "Suspended", f"job suspended at stage {names}"))
            return self.decide(
                status,
                actions=actions,
                events=self.stage_events(status) + events,
                state="Suspended",
                completed=completed,
            )
        if suspended_before:
            status.conditions = set_condition(
                status.conditions,
                ConditionType.SUSPENDED,
                False,
                "Resumed",
                f"resumed at stage {names}",
                self.now,
                self.generation,
            )
            status.start_time = format_time(self.now)  # the active deadline restarts, as for Jobs
            events.append(Event("Normal", "Resumed", f"job resumed at stage {names}"))

        start = parse_time(status.start_time) or self.created or self.now
        if status.start_time is None:
            status.start_time = format_time(start)

        # 6. active deadline
        if policy.active_deadline_seconds is not None:
            elapsed = (self.now - start).total_seconds()
            left = policy.active_deadline_seconds - elapsed
            if left <= 0:
                return self.fail(
                    status,
                    plan,
                    spec,
                    done,
                    runs,
                    set(runs),
                    "DeadlineExceeded",
                    f"job was active longer than activeDeadlineSeconds="
                    f"{policy.active_deadline_seconds} (at stage {names})",
                    events,
                )
            requeue.append(left)

        # 7. backoff limit, per stage
        for name, run in runs.items():
            if len(run.failed) > policy.backoff_limit:
                last = run.failed[-1]
                detail = last.message or (
                    f"stopped: {last.stopped}"
                    if last.stopped
                    else "succeeded without a final checkpoint in the store"
                    if last.phase == ChildPhase.SUCCEEDED
                    else "failed"
                )
                return self.backoff_exceeded(
                    status, plan, spec, done, runs, name, last.name, detail, events
                )

        # 8. progress watchdog, per stage
        progress: dict[str, Mapping[str, Any] | None] = {}
        for name, run in runs.items():
            running = next((c for c in reversed(run.active) if c.phase == ChildPhase.RUNNING), None)
            if running is None:
                continue
            if name not in observation.progress:
                return NeedStore(name, "progress", plan.run, self.s3)
            progress[name] = observation.progress[name]
            signs = [
                t
                for t in (
                    running.created,
                    running.started,
                    _progress_time(progress[name], running.created),
                )
                if t is not None
            ]
            stale_for = (self.now - max(signs)).total_seconds() if signs else 0.0
            deadline = policy.progress_deadline_seconds
            if stale_for <= deadline:
                requeue.append(deadline - stale_for)
                continue
            actions.append(StopChild(running.ref, STOPPED_STALE, running.resource_version))
            events.append(
                Event(
                    "Warning",
                    STOPPED_STALE,
                    f"stage {name} attempt {running.attempt} ({running.name}) made no "
                    f"progress for {int(stale_for)}s (progressDeadlineSeconds {deadline}); "
                    "stopping it, the next attempt resumes from the latest checkpoint",
                )
            )
            run.active = [c for c in run.active if c is not running]
            run.failed = [*run.failed, running]
            run.stopped_now = True
            if len(run.failed) > policy.backoff_limit:
                return self.backoff_exceeded(
                    status, plan, spec, done, runs, name, running.name,
                    f"no progress for {int(stale_for)}s", events, actions,
                )  # fmt: skip

        # 9. exactly one child per ready stage
        for stage in ready:
            run = runs[stage.name]
            # Should an extra attempt exist, only the newest stays.
            if len(run.active) > 1:
                actions.extend(DeleteChild(c.ref) for c in run.active[:-1])
                run.active = run.active[-1:]
            if run.active or run.stopped_now:
                continue
            backend = TuneBackend.POD
            if stage.kind == StageName.TUNE:
                backend = tune_backend(stage, rayjob_available)
                if backend == TuneBackend.RAYJOB and not rayjob_available:
                    return self.fail(
                        status,
                        plan,
                        spec,
                        done,
                        runs,
                        {stage.name},
                        "RayJobUnavailable",
                        "spec.stages.tune.backend is rayjob, but the RayJob CRD "
                        f"({RAYJOB_CRD}) was not installed when the operator started; install "
                        "KubeRay and restart the operator, or use backend pod",
                        events,
                        actions,
                    )
            run.attempt += 1
            source = done.get(stage.init_from) if stage.init_from else None
            init = source.uri if source is not None else None
            body = stage_child(self.owner, stage, spec, run.attempt, init, backend=backend)
            run.child = body["metadata"]["name"]
            actions.append(
                CreateObject(stage_config_map(self.owner, run.child, stage, run.attempt))
            )
            actions.append(CreateObject(body))
            note = f", starting from {init}" if init else ""
            if run.failed:
                note += f" (retry {len(run.failed)} of {policy.backoff_limit})"
            if stage.kind == StageName.TUNE:
                actions.append(CreateObject(dashboard_service(self.owner)))
                tune = self.tune_status(backend)
                status.tune = tune.model_copy(
                    update={"best_params": status.tune.best_params if status.tune else None}
                )
                note += (
                    f"; Ray dashboard at {tune.dashboard}; to open it at "
                    f"http://localhost:{DASHBOARD_PORT}, run: {tune.port_forward}"
                )
            events.append(
                Event(
                    "Normal",
                    "StageStarted",
                    f"stage {stage.name} attempt {run.attempt}: created {body['kind']} "
                    f"{run.child}{note}",
                )
            )

        # 10. status
        infos = {}
        for name, run in runs.items():
            state = (
                StageState.RUNNING
                if any(c.phase == ChildPhase.RUNNING for c in run.active)
                else StageState.PENDING
            )
            infos[name] = run.info(state, message=_last_failure(run.failed))
        status.stages, completed = self.stage_statuses(plan, done, infos)
        status.current_stage = _current(ready)
        status.progress = "; ".join(
            _progress_text(name, infos[name].state, runs[name].attempt, progress.get(name))
            for name in runs
        )
        if len(ready) == 1:
            [only] = ready
            message = f"stage {only.name} ({plan.names.index(only.name) + 1}/{len(plan.stages)})"
            message += f", attempt {runs[only.name].attempt}"
        else:
            message = f"stages {names} at once ({len(done)}/{len(plan.stages)} done)"
        status.conditions = set_condition(
            status.conditions,
            ConditionType.RUNNING,
            True,
            "StageRunning",
            message,
            self.now,
            self.generation,
        )
        return self.decide(
            status,
            actions=actions,
            events=self.stage_events(status) + events,
            requeue_after=min(requeue) if requeue else None,
            state="Running",
            completed=completed,
        )

    def backoff_exceeded(
        self,
        status: ULMFiTJobStatus,
        plan: Plan,
        spec: ULMFiTJobSpec,
        done: Mapping[str, FinalCheckpoint],
        runs: Mapping[str, _StageRun],
        name: str,
        attempt: str,
        detail: str,
        events: Sequence[Event],
        actions: Sequence[Action] = (),
    ) -> Decision:
        """Fail the job: stage `name` used up `backoffLimit`; `attempt` failed last (`detail`)."""
        message = (
            f"stage {name} failed {len(runs[name].failed)} times (backoffLimit "
            f"{spec.run_policy.backoff_limit}); last attempt {attempt}: {detail}"
        )
        return self.fail(
            status, plan, spec, done, runs, {name}, "BackoffLimitExceeded", message, events, actions
        )

    def fail(
        self,
        status: ULMFiTJobStatus,
        plan: Plan,
        spec: ULMFiTJobSpec,
        done: Mapping[str, FinalCheckpoint],
        runs: Mapping[str, _StageRun],
        failing: set[str],
        reason: str,
        message: str,
        events: Sequence[Event] = (),
        actions: Sequence[Action] = (),
    ) -> Decision:
        infos = {
            name: run.info(
                StageState.FAILED if name in failing else StageState.PENDING,
                message=message if name in failing else _last_failure(run.failed),
            )
            for name, run in runs.items()
        }
        status.stages, completed = self.stage_statuses(plan, done, infos)
        status.current_stage = ", ".join(name for name in runs if name in failing)
        return self.finish(
            status,
            spec,
            ConditionType.FAILED,
            reason,
            message,
            events=events,
            actions=actions,
            completed=completed,
        )

    # -- per-stage attempts and the tune stage

    def attempts_of(self, stage: PlannedStage) -> _StageRun:
        mine = sorted((c for c in self.children if c.stage == stage.name), key=lambda c: c.attempt)
        latest = mine[-1] if mine else None
        return _StageRun(
            latest=latest,
            # Reaching here means the store holds no final checkpoint for the stage, so a child
            # that reports success did not really finish: it counts as failed, like a failed one.
            failed=[
                c
                for c in mine
                if c.stopped is not None or c.phase in (ChildPhase.FAILED, ChildPhase.SUCCEEDED)
            ],
            active=[c for c in mine if c.active],
            attempt=latest.attempt if latest else 0,
            child=latest.name if latest else None,
        )

    def tune_status(self, backend: TuneBackend) -> TuneStatus:
        dashboard, port_forward = dashboard_address(self.name, self.namespace)
        return TuneStatus(
            backend="rayjob" if backend == TuneBackend.RAYJOB else "pod",
            service=dashboard_service_name(self.name),
            dashboard=dashboard,
            port_forward=port_forward,
        )

    def note_tune(
        self, status: ULMFiTJobStatus, plan: Plan, done: Mapping[str, FinalCheckpoint]
    ) -> None:
        """Record the sweep's best parameters once its final checkpoint has been read."""
        final = done.get(TUNE_KEY)
        if final is None or final.best_params is None or not plan.has(StageName.TUNE):
            return
        tune = status.tune or self.tune_status(
            TuneBackend.RAYJOB
            if any(c.kind == RAYJOB_KIND for c in self.children if c.stage == TUNE_KEY)
            else TuneBackend.POD
        )
        status.tune = tune.model_copy(update={"best_params": dict(final.best_params)})

    # -- building status.stages

    def stage_statuses(
        self,
        plan: Plan,
        done: Mapping[str, FinalCheckpoint],
        infos: Mapping[str, _StageInfo],
    ) -> tuple[list[StageStatus], list[tuple[str, float]]]:
        """One entry per stage (disabled LM stages as Skipped), plus newly finished stages."""
        result: list[tuple[int, StageStatus]] = []
        completed: list[tuple[str, float]] = []
        planned = set(plan.names)
        lm_stages = (StageName.PRETRAIN, StageName.FINETUNE)
        for index, lm in enumerate(lm_stages):
            if lm.value not in planned:
                result.append((index, StageStatus(name=lm, kind=lm, state=StageState.SKIPPED)))
        for position, stage in enumerate(plan.stages):
            order = lm_stages.index(stage.kind) if stage.kind in lm_stages else 2 + position
            name = stage.name
            old = self.old_stage(name)
            mine = [c for c in self.children if c.stage == name]
            latest = max(mine, key=lambda c: c.attempt) if mine else None
            entry = StageStatus(name=name, kind=stage.kind, state=StageState.PENDING)
            if old is not None:
                entry = old.model_copy(deep=True)
                entry.kind = stage.kind
            if name in done:
                final = done[name]
                was_done = old is not None and old.state == StageState.SUCCEEDED
                entry.state = StageState.SUCCEEDED
                entry.checkpoint = final.uri
                entry.metrics = dict(final.metrics)
                entry.message = None
                finished_at = final.created_at or self.now
                entry.completion_time = entry.completion_time or format_time(finished_at)
                if latest is not None:
                    entry.attempts = max(entry.attempts, latest.attempt)
                    entry.child = entry.child or latest.name
                    entry.failures = max(
                        entry.failures,
                        sum(1 for c in mine if c.stopped or c.phase == ChildPhase.FAILED),
                    )
                if not was_done:
                    started = parse_time(entry.start_time)
                    if started is not None:
                        completed.append(
                            (stage.kind.value, max(0.0, (finished_at - started).total_seconds()))
                        )
            elif name in infos:
                info = infos[name]
                entry.state = info.state
                entry.failures = info.failures
                entry.attempts = info.attempt or entry.attempts
                entry.child = info.child or entry.child
                entry.message = info.message or None
                if entry.start_time is None and info.attempt:
                    entry.start_time = format_time(self.now)
                entry.completion_time = None
            else:
                entry = StageStatus(name=name, kind=stage.kind, state=StageState.PENDING)
            result.append((order, entry))
        return [entry for _, entry in sorted(result, key=lambda item: item[0])], completed

    def stage_events(self, status: ULMFiTJobStatus) -> list[Event]:
        """Normal events for stages that succeeded since the old status."""
        events = []
        for entry in status.stages:
            old = self.old_stage(entry.name)
            if entry.state == StageState.SUCCEEDED and (
                old is None or old.state != StageState.SUCCEEDED
            ):
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


# ------------------------------------------------------------------------------------- helpers


def _progress_time(progress: Mapping[str, Any] | None, since: datetime | None) -> datetime | None:
    """When the trainer last reported, if that was during this attempt."""
    if not progress:
        return None
    updated = parse_time(str(progress.get("updatedAt") or ""))
    if updated is None or (since is not None and updated < since):
        return None
    return updated


@dataclass
class _StageInfo:
    """What status.stages[] says about a stage that is ready (running or about to)."""

    state: StageState
    attempt: int
    failures: int
    child: str | None
    message: str


@dataclass
class _StageRun:
    """The attempts of one ready stage, as this reconcile sees and changes them."""

    latest: Child | None
    failed: list[Child]
    active: list[Child]
    attempt: int
    child: str | None
    stopped_now: bool = False
    """The watchdog stopped an attempt in this reconcile: the next starts on the next one."""

    def info(self, state: StageState, message: str) -> _StageInfo:
        return _StageInfo(state, self.attempt, len(self.failed), self.child, message)


def _current(ready: Sequence[PlannedStage]) -> str:
    return ",".join(stage.name for stage in ready)


def _last_failure(failed: Sequence[Child]) -> str:
    if not failed:
        return ""
    last = failed[-1]
    if last.stopped:
        return f"attempt {last.attempt} stopped: {last.stopped}"
    if last.phase == ChildPhase.SUCCEEDED:
        return f"attempt {last.attempt} ended without a final checkpoint in the store"
    return f"attempt {last.attempt} failed" + (f": {last.message}" if last.message else "")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _progress_text(
    stage: str, state: StageState, attempt: int, progress: Mapping[str, Any] | None
) -> str:
    """`classifier phase 2/4, 63%`; `finetune 40%`; `classifier pending (attempt 2)`."""
    if state != StageState.RUNNING or not progress or progress.get("stage", stage) != stage:
        return f"{stage} {'running' if state == StageState.RUNNING else 'pending'}" + (
            f" (attempt {attempt})" if attempt > 1 else ""
        )
    parts = []
    phase = progress.get("phase")
    total_phases = progress.get("totalPhases") or progress.get("phases")
    if phase is not None and phase != "":
        parts.append(f"phase {phase}" + (f"/{total_phases}" if total_phases else ""))
    step, total = _number(progress.get("step")), _number(progress.get("totalSteps"))
    if step is not None and total:
        parts.append(f"{min(100, int(100 * step / total))}%")
    text = f"{stage} " + ", ".join(parts) if parts else f"{stage} running"
    return text + (f" (attempt {attempt})" if attempt > 1 else "")


def numeric_metrics(raw: Any) -> dict[str, float]:
    """The numeric scalars of a checkpoint's `meta.metrics` (what fits the status)."""
    if not isinstance(raw, Mapping):
        return {}
    found = {}
    for key, value in raw.items():
        number = _number(value)
        if number is not None:
            found[str(key)] = number
    return found


def final_checkpoint(uri: str, created_at: str, meta: Mapping[str, Any]) -> FinalCheckpoint:
    """A store `Checkpoint`'s facts that reconcile uses (the caller reads the store)."""
    model_uri = meta.get("modelUri") or meta.get("model_uri")
    best = meta.get("bestParams")
    return FinalCheckpoint(
        uri=uri,
        created_at=parse_time(created_at),
        metrics=numeric_metrics(meta.get("metrics")),
        model_uri=str(model_uri) if model_uri else None,
        best_params=numeric_metrics(best) if isinstance(best, Mapping) else None,
    )


__all__ = [
    "CONFIGMAP_KIND",
    "Action",
    "CreateObject",
    "Decision",
    "DeleteChild",
    "DeleteJob",
    "Event",
    "FinalCheckpoint",
    "NeedStore",
    "Observation",
    "StopChild",
    "final_checkpoint",
    "numeric_metrics",
    "pseudo_label_stats",
    "reconcile",
]
