"""Pure: what every child shares, whatever its kind.

The vocabulary shared by what builds children and what watches them (the runtime's cache,
`reconcile`): labels, annotations, the manager's name. Then the pieces every kind's builder is made
of: the deterministic names of everything a job owns, the `Owner` (the ULMFiTJob, whose deletion
deletes every child), the stage's ConfigMap, and the `Attempt` a workload is built from, with its
pod and container templates. Last, the reading back: `Child`, one observed child of any kind with
its `ChildPhase`, and `read_child`, which each kind's `observe` calls with its own reading of the
status.

Every pod runs as a non-root user with a read-only root filesystem; its writable places are two
emptyDirs with size limits from the spec (`resources.scratch` for `/tmp`, `resources.sharedMemory`
for `/dev/shm`); the trainer's pods mount the stage config read-only at `/etc/ulmfit`, from the
attempt's ConfigMap. `resources.podTemplate` adds to every pod (labels, annotations, tolerations,
affinity, priority, scheduler, ServiceAccount, pull secrets, volumes, env) but never replaces what
the operator sets: the API models refuse a clash, and here the operator's values are written last.
Containers report their failure through `terminationMessagePolicy: FallbackToLogsOnError` (the
trainer writes its error line to `/dev/termination-log`; without it, the log's tail).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from ulmfit_trainer.config import StageConfig, StorageSpec

from ulmfit_operator.api import (
    API_VERSION,
    KIND,
    KUEUE_QUEUE_LABEL,
    ULMFiTJobSpec,
    queue_name,
)
from ulmfit_operator.plan import PlannedStage
from ulmfit_operator.pod_overrides import OPERATOR_VOLUMES, PodTemplateOverrides
from ulmfit_operator.status import parse_time

LABEL_JOB = "ulmfit.io/job"
LABEL_STAGE = "ulmfit.io/stage"
LABEL_ATTEMPT = "ulmfit.io/attempt"
LABEL_ROLE = "ulmfit.io/role"
ROLE_RAY_HEAD = "ray-head"
"""On the pod that serves the Ray dashboard (the tune pod, or a RayJob's head): the Service
selects it."""
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "ulmfit-operator"
ANNOTATION_INIT_CHECKPOINT = "ulmfit.io/init-checkpoint"
ANNOTATION_STOPPED = "ulmfit.io/stopped"
"""Set by the operator on an attempt it stopped (the value is the reason); counts as failed."""

CONFIGMAP_KIND = "ConfigMap"

DEFAULT_TRAINING_RUNTIME = "ulmfit-torch"
"""The ClusterTrainingRuntime the chart ships and TrainJobs name (`--training-runtime`)."""

# The Ray dashboard: the tune pod or a RayJob's head serves it, the Service fronts it, and the
# NetworkPolicy lets the KubeRay operator reach it.
DASHBOARD_PORT = 8265
DASHBOARD_PORT_NAME = "dashboard"

CONFIG_DIR = "/etc/ulmfit"
CONFIG_FILE = "stage.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
RUN_AS_USER = 65532  # the non-root user of the Dockerfile's trainer image
TERMINATION_MESSAGE_POLICY = "FallbackToLogsOnError"
CONFIG_VOLUME, TMP_VOLUME, SHM_VOLUME = OPERATOR_VOLUMES

# The Training Operator names pods and Services `<child>-worker-<index>` (a DNS-1035 label,
# at most 63 characters): 50 leaves room for `-worker-1023`.
MAX_CHILD_NAME = 50
MAX_SERVICE_NAME = 63

Body = dict[str, Any]
"""A child object (or a part of one) as the plain JSON the API takes."""


def _present(body: Body) -> Body:
    """`body` without its None values (what the API's own serializers leave out)."""
    return {key: value for key, value in body.items() if value is not None}


def _wire(model: BaseModel) -> Body:
    """An API model (a piece of `podTemplate`) as the Kubernetes JSON it mirrors: fields in
    alphabetical order (as the kubernetes client writes a model), empty ones left out; maps
    (labels) keep their order."""
    out: Body = {}
    for name, field in model.__class__.model_fields.items():
        value = _wire_value(getattr(model, name))
        if value is not None and value != [] and value != {}:
            out[field.alias or name] = value
    return {key: out[key] for key in sorted(out)}


def _wire_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _wire(value)
    if isinstance(value, list):
        return [_wire_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _wire_value(item) for key, item in value.items()}
    return value


# --------------------------------------------------------------------------------------- names


def _bounded(job: str, suffix: str, limit: int) -> str:
    """`<job><suffix>` in at most `limit` characters; a long job name is cut and made unique
    with a hash of it."""
    base = job if job[:1].isalpha() else f"u{job}"  # DNS-1035: a Service name starts with a letter
    if len(base) + len(suffix) > limit:
        digest = hashlib.sha256(job.encode()).hexdigest()[:6]
        keep = limit - len(suffix) - len(digest) - 1
        base = f"{base[:keep].rstrip('-')}-{digest}"
    return base + suffix


def child_name(job: str, stage: str, attempt: int) -> str:
    """`<job>-<stage key>-a<attempt>`."""
    return _bounded(job, f"-{stage}-a{attempt}", MAX_CHILD_NAME)


def dashboard_service_name(job: str) -> str:
    """`<job>-tune-dashboard`: the Service in front of the tune stage's Ray dashboard."""
    return _bounded(job, "-tune-dashboard", MAX_SERVICE_NAME)


def dashboard_address(job: str, namespace: str) -> tuple[str, str]:
    """The dashboard's in-cluster URL and the port-forward command that opens it locally."""
    service = dashboard_service_name(job)
    return (
        f"http://{service}.{namespace}.svc:{DASHBOARD_PORT}",
        f"kubectl port-forward -n {namespace} svc/{service} {DASHBOARD_PORT}:{DASHBOARD_PORT}",
    )


def network_policy_name(job: str) -> str:
    """`<job>-pods`: the NetworkPolicy around the job's pods."""
    return _bounded(job, "-pods", MAX_SERVICE_NAME)


def config_map_name(child: str) -> str:
    return f"{child}-config"


# -------------------------------------------------------------------------------------- owners


@dataclass(frozen=True)
class Owner:
    """The ULMFiTJob that owns every child; deleting it deletes them (garbage collection)."""

    name: str
    namespace: str
    uid: str
    queue_label: str | None = None
    """The job's own `kueue.x-k8s.io/queue-name` label, if any (`spec.queueName` wins over it;
    see `Attempt.queue`)."""

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Owner:
        """The owner as the job's metadata describes it."""
        labels = metadata.get("labels") or {}
        return cls(
            name=str(metadata.get("name")),
            namespace=str(metadata.get("namespace") or "default"),
            uid=str(metadata.get("uid") or ""),
            queue_label=labels.get(KUEUE_QUEUE_LABEL) or None,
        )

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def labels(
        self, stage: str | None = None, attempt: int | None = None, role: str | None = None
    ) -> dict[str, str]:
        labels = {LABEL_JOB: self.name, LABEL_MANAGED_BY: MANAGER}
        if stage is not None:
            labels[LABEL_STAGE] = stage
        if attempt is not None:
            labels[LABEL_ATTEMPT] = str(attempt)
        if role is not None:
            labels[LABEL_ROLE] = role
        return labels

    def metadata(
        self,
        name: str,
        stage: str,
        attempt: int,
        annotations: dict[str, str] | None = None,
    ) -> Body:
        return _present(
            {
                "annotations": annotations or None,
                "labels": self.labels(stage, attempt),
                "name": name,
                "namespace": self.namespace,
                "ownerReferences": [self.owner_reference()],
            }
        )

    def owner_reference(self) -> Body:
        """`reference()` in the order the API's serializers write an ownerReference."""
        ref = self.reference()
        return {key: ref[key] for key in sorted(ref)}


def _owned_metadata(owner: Owner, name: str, labels: dict[str, str]) -> Body:
    """Metadata of a child that belongs to the whole job (the dashboard Service, the
    NetworkPolicy), not to one attempt."""
    return {
        "labels": labels,
        "name": name,
        "namespace": owner.namespace,
        "ownerReferences": [owner.owner_reference()],
    }


# ------------------------------------------------------------------------------------ builders


def stage_config_map(owner: Owner, child: str, stage: PlannedStage, attempt: int) -> Body:
    """The ConfigMap holding `stage.json` for one attempt."""
    config: StageConfig = stage.config
    text = json.dumps(config.to_wire(), indent=2, sort_keys=True) + "\n"
    return {
        "apiVersion": "v1",
        "data": {CONFIG_FILE: text},
        "kind": CONFIGMAP_KIND,
        "metadata": owner.metadata(config_map_name(child), stage.name, attempt),
    }


def torchrun_command(stage: str, workers: int, processes: int) -> list[str]:
    """torchrun with a static rendezvous on the PyTorchJob master.

    The Training Operator gives every replica MASTER_ADDR/MASTER_PORT (the master's Service) and
    RANK (0 for the master, 1.. for workers); newer releases also set the PET_* variables torchrun
    reads by itself. Passing them as flags (the kubelet expands `$(VAR)` from the container's env)
    works with both. No elastic policy: a failed process fails the attempt, and the next attempt
    resumes from the store.
    """
    return [
        "torchrun",
        f"--nnodes={workers}",
        f"--nproc-per-node={processes}",
        "--node-rank=$(RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "--max-restarts=0",
        "-m",
        "ulmfit_trainer",
        stage,
        "--config",
        CONFIG_PATH,
    ]


def single_process_command(stage: str) -> list[str]:
    """One process (evaluate; tune, which starts Ray and its trials by itself)."""
    return ["python", "-m", "ulmfit_trainer", stage, "--config", CONFIG_PATH]


def _env(name: str, value: str) -> Body:
    return {"name": name, "value": value}


def storage_env(storage: StorageSpec) -> list[Body]:
    """S3 credentials from the job's Secret, under the variable names the S3 settings read."""
    if storage.s3 is None or not storage.credentials_secret_ref:
        return []
    secret = storage.credentials_secret_ref
    s3 = storage.s3

    def from_secret(variable: str, key: str, optional: bool = False) -> Body:
        selector = _present({"key": key, "name": secret, "optional": True if optional else None})
        return {"name": variable, "valueFrom": {"secretKeyRef": selector}}

    return [
        from_secret(s3.access_key_env, "AWS_ACCESS_KEY_ID"),
        from_secret(s3.secret_key_env, "AWS_SECRET_ACCESS_KEY"),
        from_secret(s3.session_token_env, "AWS_SESSION_TOKEN", optional=True),
    ]


def _security_context() -> Body:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security_context() -> Body:
    return {
        "fsGroup": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _port(name: str, port: int) -> Body:
    return {"containerPort": port, "name": name}


def _dashboard_port() -> list[Body]:
    return [_port(DASHBOARD_PORT_NAME, DASHBOARD_PORT)]


def _empty_dir(name: str, size_limit: str, medium: str | None = None) -> Body:
    return {"emptyDir": _present({"medium": medium, "sizeLimit": size_limit}), "name": name}


@dataclass(frozen=True)
class Attempt:
    """One attempt of one stage: what its child workload is built from."""

    owner: Owner
    stage: PlannedStage
    spec: ULMFiTJobSpec
    number: int
    init_checkpoint: str | None = None
    """The checkpoint the attempt starts from, recorded on the child as an annotation."""
    training_runtime: str = DEFAULT_TRAINING_RUNTIME
    """The ClusterTrainingRuntime a TrainJob names (other kinds ignore it)."""

    @property
    def name(self) -> str:
        return child_name(self.owner.name, self.stage.name, self.number)

    @property
    def queue(self) -> str | None:
        """The Kueue LocalQueue that admits this attempt's workload (None: not queued)."""
        label = self.owner.queue_label
        return queue_name(self.spec, {KUEUE_QUEUE_LABEL: label} if label else None)

    @property
    def overrides(self) -> PodTemplateOverrides:
        return self.spec.resources.pod_template or PodTemplateOverrides()

    def metadata(self) -> Body:
        """The workload's metadata; with a queue, Kueue's label (Kueue admits by it)."""
        annotations = (
            {ANNOTATION_INIT_CHECKPOINT: self.init_checkpoint} if self.init_checkpoint else {}
        )
        body = self.owner.metadata(self.name, self.stage.name, self.number, annotations)
        if self.queue:
            body["labels"][KUEUE_QUEUE_LABEL] = self.queue
        return body

    def user_container_parts(self) -> Body:
        """What `podTemplate` adds to every container: env, envFrom, volume mounts."""
        pod = self.overrides
        return {
            "env": [_wire(variable) for variable in pod.env],
            "envFrom": [_wire(source) for source in pod.env_from] or None,
            "volumeMounts": [_wire(mount) for mount in pod.volume_mounts],
        }

    def pod(
        self,
        container: Body,
        role: str | None,
        restart_policy: str | None,
        volumes: list[Body],
    ) -> Body:
        """A pod template: the operator's hardened spec with `podTemplate` added around it."""
        res, pod = self.spec.resources, self.overrides
        spec = {
            "affinity": _wire(pod.affinity) if pod.affinity else None,
            # Pods never talk to the Kubernetes API: progress travels through the store. Not even
            # under a `serviceAccountName` of the user's: it picks the identity for image pulls
            # and workload-identity webhooks, never an API token.
            "automountServiceAccountToken": False,
            "containers": [container],
            "enableServiceLinks": False,
            "imagePullSecrets": [{"name": name} for name in pod.image_pull_secrets] or None,
            "nodeSelector": dict(res.node_selector) or None,
            "priorityClassName": pod.priority_class_name,
            "restartPolicy": restart_policy,
            "schedulerName": pod.scheduler_name,
            "securityContext": _pod_security_context(),
            "serviceAccountName": pod.service_account_name,
            "tolerations": [_wire(toleration) for toleration in pod.tolerations] or None,
            "volumes": [*volumes, *(_wire(volume) for volume in pod.volumes)],
        }
        # The operator's labels go last: they win over any the user gave (the API refuses those).
        labels = {**pod.labels, **self.owner.labels(self.stage.name, self.number, role)}
        metadata = _present({"annotations": dict(pod.annotations) or None, "labels": labels})
        return {"metadata": metadata, "spec": _present(spec)}

    def container(
        self,
        name: str,
        command: list[str] | None,
        gpus: int,
        ports: list[Body] | None = None,
        extra_env: list[Body] | None = None,
    ) -> Body:
        res = self.spec.resources
        limits = {"cpu": res.cpu, "memory": res.memory}
        if gpus > 0:
            limits["nvidia.com/gpu"] = str(gpus)
        user = self.user_container_parts()
        # The user's variables come first: a name given twice takes its last value, so the
        # operator's would win even if the API models let a clash through.
        env = [
            *user["env"],
            _env("HOME", "/tmp"),
            _env("XDG_CACHE_HOME", "/tmp/.cache"),
            _env("PYTHONUNBUFFERED", "1"),
            _env("ULMFIT_ATTEMPT", str(self.number)),
            *(extra_env or []),
            *storage_env(self.spec.storage),
        ]
        return _present(
            {
                "command": command,
                "env": env,
                "envFrom": user["envFrom"],
                "image": res.image,
                "imagePullPolicy": res.image_pull_policy,
                "name": name,
                "ports": ports or None,
                "resources": {"limits": limits, "requests": dict(limits)},
                "securityContext": _security_context(),
                "terminationMessagePolicy": TERMINATION_MESSAGE_POLICY,
                "volumeMounts": [
                    {"mountPath": CONFIG_DIR, "name": CONFIG_VOLUME, "readOnly": True},
                    {"mountPath": "/tmp", "name": TMP_VOLUME},
                    {"mountPath": "/dev/shm", "name": SHM_VOLUME},
                    *user["volumeMounts"],
                ],
            }
        )

    def pod_template(
        self,
        container: Body,
        role: str | None = None,
        restart_policy: str | None = "Never",
    ) -> Body:
        res = self.spec.resources
        volumes = [
            {
                "configMap": {
                    "items": [{"key": CONFIG_FILE, "path": CONFIG_FILE}],
                    "name": config_map_name(self.name),
                },
                "name": CONFIG_VOLUME,
            },
            _empty_dir(TMP_VOLUME, res.scratch),
            # torch's data loaders and NCCL need more shared memory than a container's 64 MiB.
            _empty_dir(SHM_VOLUME, res.shared_memory, medium="Memory"),
        ]
        return self.pod(container, role, restart_policy, volumes)


def suspend_spec() -> Body:
    """The spec part of the merge patch that suspends a batch Job, and any kind that suspends as
    it does (a RayJob)."""
    return {"suspend": True}


# -------------------------------------------------------------------------------- reading back


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


PhaseReader = Callable[[Body, Body], tuple[ChildPhase, str]]
"""One kind's reading of its object's `spec` and `status`: the phase, and why it failed."""


def read_child(body: Body, phase_of: PhaseReader) -> Child | None:
    """A child we created, as reconcile sees it, its phase as `phase_of` reads it; None without
    the labels the operator puts on every child."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    if LABEL_JOB not in labels or LABEL_STAGE not in labels:
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
    phase, message = phase_of(body.get("spec") or {}, status)
    annotations = meta.get("annotations") or {}
    return Child(
        name=str(meta.get("name")),
        namespace=str(meta.get("namespace")),
        api_version=str(body.get("apiVersion")),
        kind=str(body.get("kind")),
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
