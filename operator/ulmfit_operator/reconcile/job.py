"""Steps 1 to 3 of a reconcile, and the decision taking shape: `SeenJob`, the job as one reconcile
sees it (metadata, old status, its own children, the clock), with the new status, the actions
and the events that the later steps add to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from ulmfit_trainer.errors import InvalidSpec

from ulmfit_operator.children import Child, Owner
from ulmfit_operator.decisions import (
    Action,
    Decision,
    DeleteChild,
    DeleteJob,
    Event,
    StageGauges,
    StopChild,
)
from ulmfit_operator.status import (
    Condition,
    ConditionType,
    StageStatus,
    condition_true,
    find_condition,
    format_time,
    parse_time,
    read_status,
    set_condition,
)


class SeenJob:
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
