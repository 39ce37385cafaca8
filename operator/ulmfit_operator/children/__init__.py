"""Pure: the child objects of a ULMFiTJob, and how to read them back, one module per kind.

Each attempt of a stage is one child: for a distributed stage (LM stages, each co-trained model,
the classifier) a Kubeflow Trainer v2 `TrainJob` or a Kubeflow v1 `PyTorchJob` (its training
backend, `training_backend`; pods running torchrun either way), a `batch/v1` Job for
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
- `trainjob`, `pytorchjob`, `batch`, `rayjob`: one module per workload kind, each with its
  builder and its `observe` (its status read as a `ChildPhase`); a PyTorchJob also suspends its
  own way.
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
from typing import Any

from ulmfit_trainer.config import StageName, TuneBackend

from ulmfit_operator.api import TrainingBackend
from ulmfit_operator.children import batch, pytorchjob, rayjob, trainjob
from ulmfit_operator.children.batch import JOB_API_VERSION, JOB_KIND
from ulmfit_operator.children.common import (
    ANNOTATION_STOPPED,
    CONFIGMAP_KIND,
    DASHBOARD_PORT,
    DEFAULT_TRAINING_RUNTIME,
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
    PYTORCHJOB_CRD,
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
from ulmfit_operator.children.trainjob import (
    TRAINJOB_API_VERSION,
    TRAINJOB_CRD,
    TRAINJOB_KIND,
    TRAINJOB_PLURAL,
    training_runtime,
)
from ulmfit_operator.children.trainjob import unsupported as trainjob_unsupported
from ulmfit_operator.plan import PlannedStage

__all__ = [
    "CONFIGMAP_KIND",
    "DASHBOARD_PORT",
    "DEFAULT_TRAINING_RUNTIME",
    "JOB_API_VERSION",
    "JOB_KIND",
    "KINDS",
    "LABEL_ATTEMPT",
    "LABEL_JOB",
    "LABEL_STAGE",
    "NETWORKPOLICY_API_VERSION",
    "NETWORKPOLICY_KIND",
    "OPTIONAL_KINDS",
    "PYTORCHJOB_API_VERSION",
    "PYTORCHJOB_CRD",
    "PYTORCHJOB_KIND",
    "PYTORCHJOB_PLURAL",
    "RAYJOB_API_VERSION",
    "RAYJOB_CRD",
    "RAYJOB_KIND",
    "RAYJOB_PLURAL",
    "SERVICE_KIND",
    "TRAINJOB_API_VERSION",
    "TRAINJOB_CRD",
    "TRAINJOB_KIND",
    "TRAINJOB_PLURAL",
    "Attempt",
    "Child",
    "ChildKind",
    "ChildPhase",
    "ChildRef",
    "Cluster",
    "Owner",
    "child_workload",
    "dashboard_address",
    "dashboard_service",
    "dashboard_service_name",
    "network_policy",
    "observe_child",
    "stage_config_map",
    "stop_patch",
    "training_backend",
    "training_runtime",
    "trainjob_unsupported",
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
    TRAINJOB_KIND: ChildKind(trainjob.train_job, trainjob.observe, suspend_spec),
    PYTORCHJOB_KIND: ChildKind(pytorchjob.pytorch_job, pytorchjob.observe, pytorchjob.suspend_spec),
    JOB_KIND: ChildKind(batch.stage_job, batch.observe, suspend_spec),
    RAYJOB_KIND: ChildKind(rayjob.tune_rayjob, rayjob.observe, suspend_spec),
}
"""The workload kinds the operator creates and watches, by `kind`."""

OPTIONAL_KINDS: Mapping[str, tuple[str, str]] = {
    TRAINJOB_KIND: (TRAINJOB_API_VERSION, TRAINJOB_PLURAL),
    PYTORCHJOB_KIND: (PYTORCHJOB_API_VERSION, PYTORCHJOB_PLURAL),
    RAYJOB_KIND: (RAYJOB_API_VERSION, RAYJOB_PLURAL),
}
"""The kinds of `KINDS` a cluster may lack (each comes with its controller's CRD):
kind -> (apiVersion, plural). The operator finds at start-up which are served and watches those."""


@dataclass(frozen=True)
class Cluster:
    """The workload APIs the operator found served (discovery, at start-up and again when it is
    refreshed, never per reconcile), and its default training backend."""

    pytorchjob: bool = True
    trainjob: bool = False
    rayjob: bool = False
    training_backend: TrainingBackend = TrainingBackend.AUTO
    """The operator's `--training-backend`: what a job without `resources.trainingBackend` gets."""
    training_runtime: str = DEFAULT_TRAINING_RUNTIME
    """The ClusterTrainingRuntime TrainJobs name (`--training-runtime`)."""


def training_backend(
    wanted: TrainingBackend | None, cluster: Cluster, started_on: str | None = None
) -> tuple[TrainingBackend, tuple[str, Any, str] | None]:
    """The backend the distributed stages run on: `wanted` (a job's `resources.trainingBackend`)
    or else the operator's default; `auto` is TrainJob where it is served, else PyTorchJob, but
    a job keeps the kind its distributed stages started on (`started_on`, the kind of its
    newest such child) while that is served. With it, the problem (field, value, why) when the
    cluster does not serve its CRD, else None."""
    field = "spec.resources.trainingBackend" if wanted is not None else "--training-backend"
    backend = wanted if wanted is not None else cluster.training_backend
    if backend == TrainingBackend.AUTO:
        backend = TrainingBackend.TRAINJOB if cluster.trainjob else TrainingBackend.PYTORCHJOB
        if started_on == TRAINJOB_KIND and cluster.trainjob:
            backend = TrainingBackend.TRAINJOB
        elif started_on == PYTORCHJOB_KIND and cluster.pytorchjob:
            backend = TrainingBackend.PYTORCHJOB
        if backend == TrainingBackend.PYTORCHJOB and not cluster.pytorchjob:
            why = (
                f"auto found neither {TRAINJOB_CRD} (Kubeflow Trainer v2) nor {PYTORCHJOB_CRD} "
                "(Kubeflow Training Operator) served; install one and restart the operator"
            )
            return backend, (field, TrainingBackend.AUTO.value, why)
        return backend, None
    served, crd, what = {
        TrainingBackend.TRAINJOB: (cluster.trainjob, TRAINJOB_CRD, "Kubeflow Trainer v2"),
        TrainingBackend.PYTORCHJOB: (
            cluster.pytorchjob,
            PYTORCHJOB_CRD,
            "the Kubeflow Training Operator",
        ),
    }[backend]
    if served:
        return backend, None
    why = (
        f"the cluster does not serve {crd} ({what} is not installed, or was not when the "
        "operator started); install it, or choose another backend"
    )
    return backend, (field, backend.value, why)


def tune_backend(stage: PlannedStage, rayjob_available: bool) -> TuneBackend:
    """`auto` becomes `rayjob` where the RayJob CRD is installed, else `pod`."""
    tune = stage.config.tune
    wanted = tune.backend if tune is not None else TuneBackend.POD
    if wanted == TuneBackend.AUTO:
        return TuneBackend.RAYJOB if rayjob_available else TuneBackend.POD
    return wanted


def workload_kind(
    stage: PlannedStage,
    backend: TuneBackend = TuneBackend.POD,
    training: TrainingBackend = TrainingBackend.PYTORCHJOB,
) -> str:
    """The kind of a stage's workload: `backend` matters to a tune stage, `training` (resolved,
    not `auto`) to a distributed one."""
    if stage.kind == StageName.TUNE:
        return RAYJOB_KIND if backend == TuneBackend.RAYJOB else JOB_KIND
    if not stage.distributed:
        return JOB_KIND
    return TRAINJOB_KIND if training == TrainingBackend.TRAINJOB else PYTORCHJOB_KIND


def child_workload(
    attempt: Attempt,
    backend: TuneBackend = TuneBackend.POD,
    training: TrainingBackend = TrainingBackend.PYTORCHJOB,
) -> Body:
    """The child workload of one attempt (see `workload_kind`)."""
    return KINDS[workload_kind(attempt.stage, backend, training)].build(attempt)


def observe_child(body: Body) -> Child | None:
    """A child of a kind in `KINDS` (a TrainJob, PyTorchJob, Job or RayJob) that we created, as
    reconcile sees it; None for anything else."""
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
