"""Pure: the child objects of a ULMFiTJob, and how to read them back, one module per kind.

Each attempt of a stage is one child: a Kubeflow `PyTorchJob` (Master + Workers running torchrun)
for a distributed stage (LM stages, each co-trained model, the classifier), a `batch/v1` Job for
the single-process `evaluate`, and for `tune` either a Job whose one pod runs a Ray head (backend
`pod`) or a KubeRay `RayJob` (backend `rayjob`). Its stage config (the plan's `StageConfig` as
JSON) lives in an owned ConfigMap mounted at `/etc/ulmfit`. Names are deterministic,
`<job>-<stage key>-a<attempt>`, so an operator that restarts finds what it created instead of
creating it twice. The tune stage also gets a Service `<job>-tune-dashboard` in front of the Ray
dashboard (port 8265), owned by the job. With the operator's `--job-network-policy isolate`, a
NetworkPolicy `<job>-pods` fences the job's pods. A queued job (`api.queue_name`) gets each
workload created suspended with Kueue's queue label, for Kueue to admit.

- `common`: what every kind shares: labels and annotations, the names of everything a job owns,
  `Owner`, `Attempt` (the pod and container templates, env), the stage's ConfigMap, the Ray
  dashboard's port, and `Child`, an observed child of any kind, with `read_child`.
- `pytorchjob`, `batch`, `rayjob`: one module per workload kind, each with its builder and its
  `observe` (its status read as a `ChildPhase`); a PyTorchJob also suspends its own way.
- `service` (the Ray dashboard's Service) and `fence` (the NetworkPolicy): built, never read back.

`KINDS` maps each workload kind to its builder, its `observe` and the spec that suspends it:
`child_workload` builds through it, `observe_child` and `stop_patch` dispatch on an object's kind.
A new workload kind is one new module, one entry in `KINDS`, and the rule in `workload_kind` that
picks it for a stage.

The bodies are plain dicts, with keys in the order the kubernetes client's serializer writes them
(a model's fields by name; a map's keys as given), so that they are exactly what its typed models
made. tests/unit/test_workloads_schema.py checks them against the kubernetes and kubeflow models.
Not importing those models keeps ~140 MB of model classes out of the operator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ulmfit_trainer.config import StageName, TuneBackend

from ulmfit_operator.children import batch, pytorchjob, rayjob
from ulmfit_operator.children.batch import JOB_API_VERSION, JOB_KIND
from ulmfit_operator.children.common import (
    ANNOTATION_STOPPED,
    CONFIGMAP_KIND,
    DASHBOARD_PORT,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_STAGE,
    Attempt,
    Body,
    Child,
    ChildPhase,
    ChildRef,
    Owner,
    dashboard_address,
    dashboard_service_name,
    stage_config_map,
    suspend_spec,
)
from ulmfit_operator.children.fence import (
    NETWORKPOLICY_API_VERSION,
    NETWORKPOLICY_KIND,
    network_policy,
)
from ulmfit_operator.children.pytorchjob import (
    PYTORCHJOB_API_VERSION,
    PYTORCHJOB_KIND,
    PYTORCHJOB_PLURAL,
)
from ulmfit_operator.children.rayjob import (
    RAYJOB_API_VERSION,
    RAYJOB_CRD,
    RAYJOB_KIND,
    RAYJOB_PLURAL,
)
from ulmfit_operator.children.service import SERVICE_KIND, dashboard_service
from ulmfit_operator.plan import PlannedStage

__all__ = [
    "CONFIGMAP_KIND",
    "DASHBOARD_PORT",
    "JOB_API_VERSION",
    "JOB_KIND",
    "KINDS",
    "LABEL_ATTEMPT",
    "LABEL_JOB",
    "LABEL_STAGE",
    "NETWORKPOLICY_API_VERSION",
    "NETWORKPOLICY_KIND",
    "PYTORCHJOB_API_VERSION",
    "PYTORCHJOB_KIND",
    "PYTORCHJOB_PLURAL",
    "RAYJOB_API_VERSION",
    "RAYJOB_CRD",
    "RAYJOB_KIND",
    "RAYJOB_PLURAL",
    "SERVICE_KIND",
    "Attempt",
    "Child",
    "ChildKind",
    "ChildPhase",
    "ChildRef",
    "Owner",
    "child_workload",
    "dashboard_address",
    "dashboard_service",
    "dashboard_service_name",
    "network_policy",
    "observe_child",
    "stage_config_map",
    "stop_patch",
    "tune_backend",
    "workload_kind",
]


@dataclass(frozen=True)
class ChildKind:
    """What the operator does with one kind of child workload."""

    build: Callable[[Attempt], Body]
    """The workload of one attempt."""
    observe: Callable[[Body], Child | None]
    """An object of this kind as reconcile sees it; None if it lacks our labels."""
    suspend: Callable[[], Body]
    """The spec part of the merge patch that suspends it."""


KINDS: Mapping[str, ChildKind] = {
    PYTORCHJOB_KIND: ChildKind(pytorchjob.pytorch_job, pytorchjob.observe, pytorchjob.suspend_spec),
    JOB_KIND: ChildKind(batch.stage_job, batch.observe, suspend_spec),
    RAYJOB_KIND: ChildKind(rayjob.tune_rayjob, rayjob.observe, suspend_spec),
}
"""The workload kinds the operator creates and watches, by `kind`."""


def tune_backend(stage: PlannedStage, rayjob_available: bool) -> TuneBackend:
    """`auto` becomes `rayjob` where the RayJob CRD is installed, else `pod`."""
    tune = stage.config.tune
    wanted = tune.backend if tune is not None else TuneBackend.POD
    if wanted == TuneBackend.AUTO:
        return TuneBackend.RAYJOB if rayjob_available else TuneBackend.POD
    return wanted


def workload_kind(stage: PlannedStage, backend: TuneBackend = TuneBackend.POD) -> str:
    """The kind of a stage's workload (`backend` only matters to a tune stage)."""
    if stage.kind == StageName.TUNE:
        return RAYJOB_KIND if backend == TuneBackend.RAYJOB else JOB_KIND
    return PYTORCHJOB_KIND if stage.distributed else JOB_KIND


def child_workload(attempt: Attempt, backend: TuneBackend = TuneBackend.POD) -> Body:
    """The child workload of one attempt (`backend` only matters to a tune stage)."""
    return KINDS[workload_kind(attempt.stage, backend)].build(attempt)


def observe_child(body: Body) -> Child | None:
    """A child of a kind in `KINDS` (a PyTorchJob, Job or RayJob) that we created, as reconcile
    sees it; None for anything else."""
    kind = KINDS.get(body.get("kind", ""))
    return kind.observe(body) if kind else None


def stop_patch(kind: str, reason: str) -> Body:
    """Merge patch that suspends a child (its pods go away, the object stays as the record of a
    failed attempt) and says why. A kind not in `KINDS` gets `spec.suspend`, as a Job does."""
    known = KINDS.get(kind)
    return {
        "metadata": {"annotations": {ANNOTATION_STOPPED: reason}},
        "spec": known.suspend() if known else suspend_spec(),
    }
