"""Pure: the child workloads as the operator names and reads them back.

The vocabulary shared by what builds children (`workloads`) and what watches them (the
runtime's cache, `reconcile`): labels, annotations, kinds; then `Child`, one observed child of any
kind with its `ChildPhase`, `observe_child` that reads one from its object, and `stop_patch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from ulmfit_operator.api import KIND
from ulmfit_operator.status import parse_time

LABEL_JOB = "ulmfit.io/job"
LABEL_STAGE = "ulmfit.io/stage"
LABEL_ATTEMPT = "ulmfit.io/attempt"
LABEL_ROLE = "ulmfit.io/role"
ROLE_RAY_HEAD = "ray-head"
"""On the pod that serves the Ray dashboard (the tune pod, or a RayJob's head): the Service
selects it."""
ROLE_RAY_SUBMITTER = "ray-submitter"
"""On a RayJob's submitter pod (KubeRay runs `ray job submit` there)."""
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "ulmfit-operator"
ANNOTATION_INIT_CHECKPOINT = "ulmfit.io/init-checkpoint"
ANNOTATION_STOPPED = "ulmfit.io/stopped"
"""Set by the operator on an attempt it stopped (the value is the reason); counts as failed."""

PYTORCHJOB_API_VERSION = "kubeflow.org/v1"
PYTORCHJOB_KIND = "PyTorchJob"
PYTORCHJOB_PLURAL = "pytorchjobs"
JOB_API_VERSION = "batch/v1"
JOB_KIND = "Job"
CONFIGMAP_KIND = "ConfigMap"
SERVICE_KIND = "Service"
RAYJOB_API_VERSION = "ray.io/v1"
RAYJOB_KIND = "RayJob"
RAYJOB_PLURAL = "rayjobs"
RAYJOB_CRD = f"{RAYJOB_PLURAL}.ray.io"
NETWORKPOLICY_API_VERSION = "networking.k8s.io/v1"
NETWORKPOLICY_KIND = "NetworkPolicy"


class ChildPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


@dataclass(frozen=True)
class Child:
    """One observed child workload, whatever its kind."""

    name: str
    namespace: str
    api_version: str
    kind: str
    job: str
    """Name of the owning ULMFiTJob (from the `ulmfit.io/job` label)."""
    stage: str
    attempt: int
    owner_uid: str
    phase: ChildPhase
    message: str = ""
    """Why it failed (reason: message of its Failed condition)."""
    created: datetime | None = None
    started: datetime | None = None
    deleting: bool = False
    stopped: str | None = None
    """The reason the operator stopped this attempt (it counts as failed)."""
    resource_version: str = ""
    resumed: datetime | None = None
    """When it was last unsuspended (a queue admitted it), if its controller says so."""

    @property
    def active(self) -> bool:
        """Still working on the stage, or waiting to: neither finished, nor stopped, nor going
        away."""
        return (
            not self.deleting
            and self.stopped is None
            and self.phase in (ChildPhase.PENDING, ChildPhase.RUNNING, ChildPhase.SUSPENDED)
        )

    @property
    def waiting(self) -> bool:
        """Suspended by someone else (a queue such as Kueue holds it until it admits it): the
        attempt waits; it has neither failed nor started."""
        return self.active and self.phase == ChildPhase.SUSPENDED

    @property
    def ref(self) -> ChildRef:
        return ChildRef(self.api_version, self.kind, self.namespace, self.name)


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    namespace: str
    name: str


def _true_conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        str(c.get("type")): c
        for c in status.get("conditions") or []
        if isinstance(c, dict) and c.get("status") == "True"
    }


def _failure_message(condition: dict[str, Any] | None) -> str:
    if not condition:
        return ""
    reason, message = condition.get("reason") or "", condition.get("message") or ""
    return f"{reason}: {message}" if reason and message else reason or message


def observe_child(body: dict[str, Any]) -> Child | None:
    """A PyTorchJob, Job or RayJob we created, as reconcile sees it; None for anything else."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    kind = body.get("kind")
    if (
        LABEL_JOB not in labels
        or LABEL_STAGE not in labels
        or kind not in (PYTORCHJOB_KIND, JOB_KIND, RAYJOB_KIND)
    ):
        return None
    try:
        attempt = int(labels.get(LABEL_ATTEMPT, "0"))
    except ValueError:
        return None
    owner_uid = next(
        (
            ref.get("uid", "")
            for ref in meta.get("ownerReferences") or []
            if ref.get("kind") == KIND and ref.get("controller")
        ),
        "",
    )
    status = body.get("status") or {}
    spec = body.get("spec") or {}
    true = _true_conditions(status)
    message = ""
    if kind == PYTORCHJOB_KIND:
        if "Succeeded" in true:
            phase = ChildPhase.SUCCEEDED
        elif "Failed" in true:
            phase, message = ChildPhase.FAILED, _failure_message(true["Failed"])
        elif "Suspended" in true or (spec.get("runPolicy") or {}).get("suspend"):
            phase = ChildPhase.SUSPENDED
        elif "Running" in true:
            phase = ChildPhase.RUNNING
        else:
            phase = ChildPhase.PENDING
    elif kind == RAYJOB_KIND:
        phase, message = _rayjob_phase(spec, status)
    else:
        if "Complete" in true:
            phase = ChildPhase.SUCCEEDED
        elif "Failed" in true:
            phase, message = ChildPhase.FAILED, _failure_message(true["Failed"])
        elif "Suspended" in true or spec.get("suspend"):
            phase = ChildPhase.SUSPENDED
        elif status.get("active") or status.get("ready"):
            phase = ChildPhase.RUNNING
        else:
            phase = ChildPhase.PENDING
    annotations = meta.get("annotations") or {}
    return Child(
        name=str(meta.get("name")),
        namespace=str(meta.get("namespace")),
        api_version=str(body.get("apiVersion")),
        kind=str(kind),
        job=str(labels[LABEL_JOB]),
        stage=str(labels[LABEL_STAGE]),
        attempt=attempt,
        owner_uid=owner_uid,
        phase=phase,
        message=message,
        created=parse_time(meta.get("creationTimestamp")),
        started=parse_time(status.get("startTime")),
        deleting=bool(meta.get("deletionTimestamp")),
        stopped=annotations.get(ANNOTATION_STOPPED),
        resource_version=str(meta.get("resourceVersion", "")),
        resumed=_resumed_at(status),
    )


def _resumed_at(status: dict[str, Any]) -> datetime | None:
    """The time a `Suspended` condition last turned False (PyTorchJob and batch Job alike)."""
    for condition in status.get("conditions") or []:
        if (
            isinstance(condition, dict)
            and condition.get("type") == "Suspended"
            and condition.get("status") == "False"
        ):
            return parse_time(condition.get("lastTransitionTime"))
    return None


def _rayjob_phase(spec: dict[str, Any], status: dict[str, Any]) -> tuple[ChildPhase, str]:
    """A RayJob's `jobStatus` (the Ray job) and `jobDeploymentStatus` (KubeRay's) as a phase."""
    job_status = str(status.get("jobStatus") or "").upper()
    deployment = str(status.get("jobDeploymentStatus") or "")
    if job_status == "SUCCEEDED":
        return ChildPhase.SUCCEEDED, ""
    if job_status in ("FAILED", "STOPPED") or deployment == "Failed":
        reason = str(status.get("reason") or f"RayJob{job_status.title() or deployment}")
        detail = str(status.get("message") or "")
        return ChildPhase.FAILED, f"{reason}: {detail}" if detail else reason
    if deployment == "Complete":
        return ChildPhase.SUCCEEDED, ""
    if spec.get("suspend") or deployment in ("Suspending", "Suspended"):
        return ChildPhase.SUSPENDED, ""
    if job_status == "RUNNING" or deployment == "Running":
        return ChildPhase.RUNNING, ""
    return ChildPhase.PENDING, ""


def stop_patch(kind: str, reason: str) -> dict[str, Any]:
    """Merge patch that suspends a child (its pods go away, the object stays as the record of a
    failed attempt) and says why."""
    patch: dict[str, Any] = {"metadata": {"annotations": {ANNOTATION_STOPPED: reason}}}
    if kind == PYTORCHJOB_KIND:
        patch["spec"] = {"runPolicy": {"suspend": True}}
    else:  # a batch Job and a RayJob both suspend with spec.suspend
        patch["spec"] = {"suspend": True}
    return patch
