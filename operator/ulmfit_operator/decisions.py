"""Pure: what reconcile decides, for the operator's runtime to carry out.

A `Decision` holds the actions on the cluster (create a child, stop or delete one, delete the
job), the new status (None when nothing changed), the events to post and when to look again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ulmfit_operator.children import ChildRef

EVENT_MESSAGE_LIMIT = 1000
"""Kubernetes caps event messages at 1024 bytes; stay under it with room for an ellipsis."""


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
class StageGauges:
    """One ready stage's numbers for the per-job Prometheus gauges."""

    stage: str
    attempts: int
    progress: float | None = None
    """Share of the stage's steps done (0 to 1), once it has reported."""
    loss: float | None = None
    tokens_per_second: float | None = None
    queued_seconds: float | None = None
    """How long its attempt has waited for its queue, while it waits."""


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...] = ()
    status: dict[str, Any] | None = None
    """The whole new status when it differs from the old one; None: leave it alone."""
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None
    """Look again after this many seconds (a deadline or TTL falls due), besides the resync."""
    state: str = "Pending"
    """Summary for metrics: Pending, Running, Suspended, Succeeded, Failed (Deleting: left
    alone)."""
    completed_stages: tuple[tuple[str, float], ...] = ()
    """Stages that finished in this decision, with their duration in seconds."""
    gauges: tuple[StageGauges, ...] = ()
    """The ready stages' numbers (none once the job has finished or is suspended)."""


__all__ = [
    "EVENT_MESSAGE_LIMIT",
    "Action",
    "CreateObject",
    "Decision",
    "DeleteChild",
    "DeleteJob",
    "Event",
    "StageGauges",
    "StopChild",
]
