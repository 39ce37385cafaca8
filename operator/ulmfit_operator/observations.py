"""Pure: what reconcile knows of the store, and how it asks for more.

Per stage, the store holds a final checkpoint (the stage is done) and a `progress.json` (what a
running attempt last reported). `reconcile` reads them from an `Observation`; when it needs a
fact the observation lacks it returns `NeedStore`, and the caller reads it and asks again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError
from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.records import StageProgress, StageResult, numeric_values

from ulmfit_operator.status import parse_time


@dataclass(frozen=True)
class FinalCheckpoint:
    """A stage's committed final checkpoint, as the store holds it."""

    uri: str
    created_at: datetime | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    """The numeric scalars of the stage's result metrics (what fits the status)."""
    model_uri: str | None = None
    """Where the stage exported a model, when it says so in its meta (`modelUri`)."""
    best_params: Mapping[str, float] | None = None
    """A tune stage's best hyperparameters (its meta's `bestParams`)."""


def final_checkpoint(uri: str, created_at: str, meta: Mapping[str, Any]) -> FinalCheckpoint:
    """A store checkpoint's facts that reconcile uses (the caller reads the store). `meta` is the
    stage's `StageResult`; one that does not parse still marks the stage done, without facts."""
    try:
        result = StageResult.model_validate(dict(meta))
    except ValidationError:
        result = StageResult()
    return FinalCheckpoint(
        uri=uri,
        created_at=parse_time(created_at),
        metrics=result.numeric_metrics(),
        model_uri=result.model_uri or None,
        best_params=numeric_values(result.best_params) if result.best_params is not None else None,
    )


@dataclass(frozen=True)
class Observation:
    """Facts read so far: store facts per stage name, pod reports per child name; a key missing
    from a map was not read."""

    checkpoints: Mapping[str, FinalCheckpoint | None] = field(default_factory=dict)
    progress: Mapping[str, StageProgress | None] = field(default_factory=dict)
    pods: Mapping[str, str] = field(default_factory=dict)
    """Per child: why its pods have not started (`pod_report`), "" when nothing says why."""

    def with_checkpoint(self, stage: str, value: FinalCheckpoint | None) -> Observation:
        return Observation({**self.checkpoints, stage: value}, self.progress, self.pods)

    def with_progress(self, stage: str, value: StageProgress | None) -> Observation:
        return Observation(self.checkpoints, {**self.progress, stage: value}, self.pods)

    def with_pods(self, child: str, report: str) -> Observation:
        return Observation(self.checkpoints, self.progress, {**self.pods, child: report})


@dataclass(frozen=True)
class NeedPods:
    """Reconcile needs to know why a child's pods have not started: list the pods matching
    `selector` in `namespace`, summarize them with `pod_report`, add that, and call again."""

    child: str
    namespace: str
    selector: str


_STUCK_WAITING = {
    "ErrImagePull",
    "ErrImageNeverPull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
    "RunContainerError",
}
"""Container waiting reasons that do not go away by waiting (pulls, missing Secrets, ...)."""


def pod_report(pods: Sequence[Mapping[str, Any]]) -> str:
    """Why these pods have not started, in their own words: `pod P: Unschedulable: 0/1 nodes
    are available: ...; pod Q container trainer: ImagePullBackOff: ...`. Pods that run or wait
    for nothing in particular say nothing; no pods at all says so."""
    if not pods:
        return "no pods were created"
    lines: list[str] = []
    for pod in sorted(pods, key=lambda p: str((p.get("metadata") or {}).get("name"))):
        name = str((pod.get("metadata") or {}).get("name"))
        status = pod.get("status") or {}
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                lines.append(_reason_line(f"pod {name}", condition))
        for container in [
            *(status.get("initContainerStatuses") or []),
            *(status.get("containerStatuses") or []),
        ]:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _STUCK_WAITING:
                lines.append(_reason_line(f"pod {name} container {container.get('name')}", waiting))
    return "; ".join(lines)


def _reason_line(where: str, source: Mapping[str, Any]) -> str:
    reason, message = source.get("reason") or "", source.get("message") or ""
    return f"{where}: {reason}" + (f": {message}" if message else "")


@dataclass(frozen=True)
class NeedStore:
    """Reconcile needs a store fact: read it, add it to the observation, call again."""

    stage: str
    what: Literal["checkpoint", "progress"]
    run: str
    """The job instance's run path, `<namespace>/<job>/<uid>`: where its store objects live."""
    s3: S3Settings | None


__all__ = [
    "FinalCheckpoint",
    "NeedPods",
    "NeedStore",
    "Observation",
    "final_checkpoint",
    "pod_report",
]
