"""Pure: what the operator should do about one ULMFiTJob, given what it observes.

`reconcile(job, children, observation, now)` reads the job object (spec, metadata, the status
cache), the children found in the cluster and what the store says (final checkpoints and
`progress.json` per stage), and returns a `Decision`: children to create, stop or delete, the
new status (None when nothing changed) and events. No I/O happens here; when it needs a store
fact it has not been given, it returns `NeedStore(stage, what)` and the caller reads it and asks
again (so the store is read only as far as the decision needs).

The fixed order, as in Kubeflow's controllers:

1. a job being deleted is left alone;
2. validate the spec (`InvalidSpec`: Failed condition, Warning event, no children, no retry);
3. a finished job only waits for its TTL (then it is deleted);
4. walk the plan: a stage is done once the store holds its final checkpoint (made after the
   job was created); the first stage that is not done is the current one; all done: Succeeded;
5. suspend (delete running children, keep checkpoints) and resume;
6. active deadline;
7. backoff limit (failed attempts of the current stage);
8. progress watchdog (a running attempt whose progress is stale is stopped: a failed attempt);
9. exactly one child for the current stage: create the next attempt when none is active;
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

from ulmfit_trainer.config import StageName
from ulmfit_trainer.errors import InvalidSpec
from ulmfit_trainer.store import S3Settings

from ulmfit_operator.api import Metadata, StageState, ULMFiTJob, ULMFiTJobSpec, parse_spec
from ulmfit_operator.plan import Plan, PlannedStage, make_plan
from ulmfit_operator.status import (
    ConditionType,
    JobResult,
    StageStatus,
    ULMFiTJobStatus,
    clear_condition,
    condition_true,
    find_condition,
    format_time,
    parse_time,
    read_status,
    set_condition,
)
from ulmfit_operator.workloads import (
    CONFIGMAP_KIND,
    Child,
    ChildPhase,
    ChildRef,
    Owner,
    stage_child,
    stage_config_map,
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
) -> Decision | NeedStore:
    """Decide; see the module docstring for the order of the checks."""
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

    # 4. walk the plan
    done: dict[str, FinalCheckpoint] = {}
    current: PlannedStage | None = None
    for stage in plan.stages:
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
            continue
        current = stage
        break
    if current is None:
        return ctx.succeeded(plan, spec, done, observation)
    return ctx.run_stage(plan, spec, current, done, observation)


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
        self,
        plan: Plan,
        spec: ULMFiTJobSpec,
        done: Mapping[str, FinalCheckpoint],
        observation: Observation,
    ) -> Decision:
        status = self.old.model_copy(deep=True)
        stages, completed = self.stage_statuses(plan, spec, done, None, {})
        status.stages = stages
        evaluate = done.get(StageName.EVALUATE)
        classifier = done.get(StageName.CLASSIFIER)
        model_uri = (evaluate.model_uri if evaluate else None) or (
            classifier.uri if classifier else None
        )
        status.result = JobResult(
            model_uri=model_uri, test_metrics=dict(evaluate.metrics) if evaluate else {}
        )
        last = plan.stages[-1].name
        status.current_stage = last
        status.progress = "Succeeded"
        ended = evaluate.created_at if evaluate and evaluate.created_at else self.now
        status.completion_time = status.completion_time or format_time(ended)
        accuracy = status.result.test_metrics.get("accuracy")
        summary = f"all {len(plan.stages)} stages succeeded; model at {model_uri}"
        if accuracy is not None:
            summary += f"; test accuracy {accuracy:.4f}"
            baseline = status.result.test_metrics.get("majorityBaseline")
            if baseline is not None:
                summary += f" (majority baseline {baseline:.4f})"
        status.conditions = set_condition(
            status.conditions,
            ConditionType.SUCCEEDED,
            True,
            "Succeeded",
            summary,
            self.now,
            self.generation,
        )
        status.conditions = clear_condition(
            status.conditions,
            ConditionType.RUNNING,
            "Succeeded",
            summary,
            self.now,
            self.generation,
        )
        events = [*self.stage_events(status), Event("Normal", "Succeeded", summary)]
        spec_ttl = spec.run_policy.ttl_seconds_after_finished
        return self.decide(
            status,
            events=events,
            requeue_after=float(spec_ttl) if spec_ttl is not None else None,
            state="Succeeded",
            completed=completed,
        )

    # -- 5..10. the current stage

    def run_stage(
        self,
        plan: Plan,
        spec: ULMFiTJobSpec,
        current: PlannedStage,
        done: Mapping[str, FinalCheckpoint],
        observation: Observation,
    ) -> Decision | NeedStore:
        policy = spec.run_policy
        status = self.old.model_copy(deep=True)
        mine = sorted(
            (c for c in self.children if c.stage == current.name), key=lambda c: c.attempt
        )
        latest = mine[-1] if mine else None
        # Reaching here means the store holds no final checkpoint for the stage, so a child
        # that reports success did not really finish: it counts as failed, like a failed one.
        failed = [
            c
            for c in mine
            if c.stopped is not None or c.phase in (ChildPhase.FAILED, ChildPhase.SUCCEEDED)
        ]
        active = [c for c in mine if c.active]
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
            status.current_stage = current.name
            status.progress = "Suspended"
            stages, completed = self.stage_statuses(
                plan,
                spec,
                done,
                current,
                {
                    "state": StageState.PENDING,
                    "failed": failed,
                    "latest": latest,
                    "message": "suspended",
                },
            )
            status.stages = stages
            if not suspended_before:
                events.append(
                    Event("Normal", "Suspended", f"job suspended at stage {current.name}")
                )
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
                f"resumed at stage {current.name}",
                self.now,
                self.generation,
            )
            status.start_time = format_time(self.now)  # the active deadline restarts, as for Jobs
            events.append(Event("Normal", "Resumed", f"job resumed at stage {current.name}"))

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
                    current,
                    failed,
                    latest,
                    "DeadlineExceeded",
                    f"job was active longer than activeDeadlineSeconds="
                    f"{policy.active_deadline_seconds} (at stage {current.name})",
                    events,
                )
            requeue.append(left)

        # 7. backoff limit
        if len(failed) > policy.backoff_limit:
            last = failed[-1]
            detail = last.message or (
                f"stopped: {last.stopped}"
                if last.stopped
                else "succeeded without a final checkpoint in the store"
                if last.phase == ChildPhase.SUCCEEDED
                else "failed"
            )
            return self.fail(
                status,
                plan,
                spec,
                done,
                current,
                failed,
                latest,
                "BackoffLimitExceeded",
                f"stage {current.name} failed {len(failed)} times (backoffLimit "
                f"{policy.backoff_limit}); last attempt {last.name}: {detail}",
                events,
            )

        # 8. progress watchdog
        progress: Mapping[str, Any] | None = None
        running = next((c for c in reversed(active) if c.phase == ChildPhase.RUNNING), None)
        if running is not None:
            if current.name not in observation.progress:
                return NeedStore(current.name, "progress", plan.run, self.s3)
            progress = observation.progress[current.name]
            signs = [
                t
                for t in (
                    running.created,
                    running.started,
                    _progress_time(progress, running.created),
                )
                if t is not None
            ]
            stale_for = (self.now - max(signs)).total_seconds() if signs else 0.0
            deadline = policy.progress_deadline_seconds
            if stale_for > deadline:
                actions.append(StopChild(running.ref, STOPPED_STALE, running.resource_version))
                events.append(
                    Event(
                        "Warning",
                        STOPPED_STALE,
                        f"stage {current.name} attempt {running.attempt} ({running.name}) made no "
                        f"progress for {int(stale_for)}s (progressDeadlineSeconds {deadline}); "
                        "stopping it, the next attempt resumes from the latest checkpoint",
                    )
                )
                active = [c for c in active if c is not running]
                failed = [*failed, running]
                if len(failed) > policy.backoff_limit:
                    return self.fail(
                        status,
                        plan,
                        spec,
                        done,
                        current,
                        failed,
                        latest,
                        "BackoffLimitExceeded",
                        f"stage {current.name} failed {len(failed)} times (backoffLimit "
                        f"{policy.backoff_limit}); last attempt {running.name}: "
                        f"no progress for {int(stale_for)}s",
                        events,
                        actions,
                    )
            else:
                requeue.append(deadline - stale_for)

        # Exactly one attempt at a time: should an extra one exist, only the newest stays.
        if len(active) > 1:
            actions.extend(DeleteChild(c.ref) for c in active[:-1])
            active = active[-1:]

        # 9. exactly one child
        child_name = latest.name if latest else None
        attempt = latest.attempt if latest else 0
        if not active and not any(isinstance(a, StopChild) for a in actions):
            attempt += 1
            previous = (
                plan.stages[plan.names.index(current.name) - 1]
                if (plan.names.index(current.name) > 0)
                else None
            )
            init = done[previous.name].uri if previous is not None else None
            body = stage_child(self.owner, current, spec, attempt, init)
            child_name = body["metadata"]["name"]
            actions.append(CreateObject(stage_config_map(self.owner, child_name, current, attempt)))
            actions.append(CreateObject(body))
            resume = f", starting from {init}" if init else ""
            if failed:
                resume += f" (retry {len(failed)} of {policy.backoff_limit})"
            events.append(
                Event(
                    "Normal",
                    "StageStarted",
                    f"stage {current.name} attempt {attempt}: created {body['kind']} {child_name}"
                    f"{resume}",
                )
            )
        stage_state = (
            StageState.RUNNING
            if any(c.phase == ChildPhase.RUNNING for c in active)
            else StageState.PENDING
        )
        stages, completed = self.stage_statuses(
            plan,
            spec,
            done,
            current,
            {
                "state": stage_state,
                "failed": failed,
                "attempt": attempt,
                "child": child_name,
                "message": _last_failure(failed),
            },
        )
        status.stages = stages
        status.current_stage = current.name
        status.progress = _progress_text(current.name, stage_state, attempt, progress)
        message = f"stage {current.name} ({plan.names.index(current.name) + 1}/{len(plan.stages)})"
        message += f", attempt {attempt}"
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

    def fail(
        self,
        status: ULMFiTJobStatus,
        plan: Plan,
        spec: ULMFiTJobSpec,
        done: Mapping[str, FinalCheckpoint],
        current: PlannedStage,
        failed: Sequence[Child],
        latest: Child | None,
        reason: str,
        message: str,
        events: Sequence[Event] = (),
        actions: Sequence[Action] = (),
    ) -> Decision:
        stages, completed = self.stage_statuses(
            plan,
            spec,
            done,
            current,
            {"state": StageState.FAILED, "failed": failed, "latest": latest, "message": message},
        )
        status.stages = stages
        status.current_stage = current.name
        status.progress = f"Failed: {reason}"
        status.completion_time = status.completion_time or format_time(self.now)
        status.conditions = set_condition(
            status.conditions,
            ConditionType.FAILED,
            True,
            reason,
            message,
            self.now,
            self.generation,
        )
        status.conditions = clear_condition(
            status.conditions,
            ConditionType.RUNNING,
            reason,
            message,
            self.now,
            self.generation,
        )
        ttl = spec.run_policy.ttl_seconds_after_finished
        return self.decide(
            status,
            actions=[*actions, *self.delete_active()],
            events=[*self.stage_events(status), *events, Event("Warning", reason, message)],
            requeue_after=float(ttl) if ttl is not None else None,
            state="Failed",
            completed=completed,
        )

    # -- building status.stages

    def stage_statuses(
        self,
        plan: Plan,
        spec: ULMFiTJobSpec,
        done: Mapping[str, FinalCheckpoint],
        current: PlannedStage | None,
        current_info: Mapping[str, Any],
    ) -> tuple[list[StageStatus], list[tuple[str, float]]]:
        """One entry per stage (disabled LM stages as Skipped), plus newly finished stages."""
        result: list[StageStatus] = []
        completed: list[tuple[str, float]] = []
        planned = set(plan.names)
        for name in StageName:
            if name not in planned:
                if name in (StageName.PRETRAIN, StageName.FINETUNE):
                    result.append(StageStatus(name=name, state=StageState.SKIPPED))
                continue
            old = self.old_stage(name)
            mine = [c for c in self.children if c.stage == name]
            latest = max(mine, key=lambda c: c.attempt) if mine else None
            entry = StageStatus(name=name, state=StageState.PENDING)
            if old is not None:
                entry = old.model_copy(deep=True)
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
                        completed.append((name, max(0.0, (finished_at - started).total_seconds())))
            elif current is not None and name == current.name:
                entry.state = current_info["state"]
                failed = current_info.get("failed", [])
                entry.failures = len(failed)
                attempt = current_info.get("attempt")
                if attempt is None:
                    attempt = latest.attempt if latest else entry.attempts
                entry.attempts = attempt
                entry.child = current_info.get("child") or (latest.name if latest else entry.child)
                entry.message = current_info.get("message") or None
                if entry.start_time is None and attempt:
                    entry.start_time = format_time(self.now)
                entry.completion_time = None
            else:
                entry = StageStatus(name=name, state=StageState.PENDING)
            result.append(entry)
        return result, completed

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
    return FinalCheckpoint(
        uri=uri,
        created_at=parse_time(created_at),
        metrics=numeric_metrics(meta.get("metrics")),
        model_uri=str(model_uri) if model_uri else None,
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
    "reconcile",
]
