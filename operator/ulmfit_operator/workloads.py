"""Pure: the child objects of a ULMFiTJob, and how to read them back.

Each attempt of a stage is one child: a Kubeflow `PyTorchJob` (Master + Workers running torchrun)
for a distributed stage (LM stages, each co-trained model, the classifier), a `batch/v1` Job for
the single-process `evaluate`, and for `tune` either a Job whose one pod runs a Ray head (backend
`pod`) or a KubeRay `RayJob` (backend `rayjob`). Its stage config (the plan's `StageConfig` as
JSON) lives in an owned ConfigMap mounted at `/etc/ulmfit`. Names are deterministic,
`<job>-<stage key>-a<attempt>`, so an operator that restarts finds what it created instead of
creating it twice. The tune stage also gets a Service `<job>-tune-dashboard` in front of the Ray
dashboard (port 8265), owned by the job. With the operator's `--job-network-policy isolate`, a
NetworkPolicy `<job>-pods` fences the job's pods (see `network_policy`).

Every pod runs as a non-root user with a read-only root filesystem; its writable places are two
emptyDirs with size limits from the spec (`resources.scratch` for `/tmp`,
`resources.sharedMemory` for `/dev/shm`). `resources.podTemplate` adds to every pod (labels,
annotations, tolerations, affinity, priority, scheduler, ServiceAccount, pull secrets, volumes,
env) but never replaces what the operator sets: the API models refuse a clash, and here the
operator's values are written last. Containers report their failure through
`terminationMessagePolicy: FallbackToLogsOnError` (the trainer writes its error line to
`/dev/termination-log`; without it, the log's tail). A queued job (`api.queue_name`) gets each
workload created suspended with Kueue's queue label, for Kueue to admit.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from ulmfit_trainer.config import StageConfig, StageName, StorageSpec, TuneBackend, TuneSpec

from ulmfit_operator.api import (
    API_VERSION,
    KIND,
    KUEUE_QUEUE_LABEL,
    ULMFiTJobSpec,
    queue_name,
)
from ulmfit_operator.children import (
    ANNOTATION_INIT_CHECKPOINT,
    CONFIGMAP_KIND,
    JOB_API_VERSION,
    JOB_KIND,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_MANAGED_BY,
    LABEL_ROLE,
    LABEL_STAGE,
    MANAGER,
    NETWORKPOLICY_API_VERSION,
    NETWORKPOLICY_KIND,
    PYTORCHJOB_API_VERSION,
    PYTORCHJOB_KIND,
    RAYJOB_API_VERSION,
    RAYJOB_KIND,
    ROLE_RAY_HEAD,
    ROLE_RAY_SUBMITTER,
    SERVICE_KIND,
)
from ulmfit_operator.plan import TUNE_KEY, PlannedStage
from ulmfit_operator.pod_overrides import OPERATOR_VOLUMES, PodTemplateOverrides
from ulmfit_operator.policy import PodNetwork

# The Training Operator looks the container and its port up by these names.
PYTORCH_CONTAINER = "pytorch"
PYTORCH_PORT_NAME = "pytorchjob-port"
PYTORCH_PORT = 23456
EVALUATE_CONTAINER = "evaluate"
TUNE_CONTAINER = "tune"
RAY_HEAD_CONTAINER = "ray-head"
RAY_WORKER_CONTAINER = "ray-worker"
DASHBOARD_PORT = 8265
DASHBOARD_PORT_NAME = "dashboard"
RAY_GCS_PORT = 6379
RAY_CLIENT_PORT = 10001

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


# ------------------------------------------------------------------------------------ builders
#
# Plain dicts, with keys in the order the kubernetes client's serializer writes them (a model's
# fields by name; a map's keys as given), so that the bodies are exactly what its typed models
# made. tests/unit/test_workloads_schema.py checks them against the kubernetes and kubeflow
# models. Not importing those models keeps ~140 MB of model classes out of the operator.


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


def pytorch_job(attempt: Attempt) -> Body:
    """The PyTorchJob for one attempt of a distributed stage: 1 Master + (workers - 1) Workers."""
    res = attempt.spec.resources
    command = torchrun_command(attempt.stage.kind.value, res.workers, res.processes_per_worker)
    port = [_port(PYTORCH_PORT_NAME, PYTORCH_PORT)]

    def replicas(count: int) -> Body:
        container = attempt.container(PYTORCH_CONTAINER, command, res.gpus_per_worker, port)
        return {
            "replicas": count,
            "restartPolicy": "Never",
            "template": attempt.pod_template(container),
        }

    replica_specs = {"Master": replicas(1)}
    if res.workers > 1:
        replica_specs["Worker"] = replicas(res.workers - 1)
    run_policy = {
        # Retries are ours (a new attempt that resumes from the store), not pod restarts.
        "backoffLimit": 0,
        "cleanPodPolicy": "Running",
        "schedulingPolicy": scheduling_policy(attempt.spec),
        "suspend": True if attempt.queue else None,
    }
    return {
        "apiVersion": PYTORCHJOB_API_VERSION,
        "kind": PYTORCHJOB_KIND,
        "metadata": attempt.metadata(),
        "spec": {
            "nprocPerNode": str(res.processes_per_worker),
            "pytorchReplicaSpecs": replica_specs,
            "runPolicy": _present(run_policy),
        },
    }


def scheduling_policy(spec: ULMFiTJobSpec) -> Body | None:
    """The PyTorchJob's gang-scheduling policy (`runPolicy.schedulingPolicy`), None without one.
    `minAvailable` defaults to every pod of the stage: torchrun's static rendezvous needs them
    all, and a half-placed gang would hold its GPUs while it waits for the rest."""
    gang = spec.run_policy.scheduling_policy
    if gang is None:
        return None
    return _present(
        {
            "minAvailable": gang.min_available or spec.resources.workers,
            "priorityClass": gang.priority_class,
            "queue": gang.queue,
            "scheduleTimeoutSeconds": gang.schedule_timeout_seconds,
        }
    )


def _batch_job(attempt: Attempt, container: Body, role: str | None = None) -> Body:
    return {
        "apiVersion": JOB_API_VERSION,
        "kind": JOB_KIND,
        "metadata": attempt.metadata(),
        "spec": _present(
            {
                "backoffLimit": 0,
                # Queued: Kueue unsuspends the Job when it admits it.
                "suspend": True if attempt.queue else None,
                "template": attempt.pod_template(container, role),
            }
        ),
    }


def evaluate_job(attempt: Attempt) -> Body:
    """The batch/v1 Job for one attempt of the single-process `evaluate` stage."""
    gpus = min(attempt.spec.resources.gpus_per_worker, 1)
    command = single_process_command(attempt.stage.kind.value)
    return _batch_job(attempt, attempt.container(EVALUATE_CONTAINER, command, gpus))


def tune_gpus(tune: TuneSpec, spec: ULMFiTJobSpec) -> int:
    """GPUs of the pod that runs a whole sweep (backend `pod`).

    With `concurrentTrials` set, enough for that many trials at once:
    ceil(gpusPerTrial x concurrentTrials). Otherwise `resources.gpusPerWorker` (Ray runs as many
    trials as fit), but at least enough for one trial.
    """
    if tune.gpus_per_trial <= 0:
        return 0
    if tune.concurrent_trials is not None:
        return math.ceil(tune.gpus_per_trial * tune.concurrent_trials)
    return max(spec.resources.gpus_per_worker, math.ceil(tune.gpus_per_trial))


def _dashboard_port() -> list[Body]:
    return [_port(DASHBOARD_PORT_NAME, DASHBOARD_PORT)]


def tune_job(attempt: Attempt) -> Body:
    """Backend `pod`: a batch/v1 Job whose one pod starts a Ray head and runs the whole sweep.

    Its dashboard listens on the pod's loopback only: the job-submission API behind it has no
    authentication, and nothing but `kubectl port-forward` (which connects inside the pod) needs
    it."""
    tune = attempt.stage.config.tune
    assert tune is not None  # a tune stage's config always carries its sweep
    env = [
        _env("ULMFIT_RAY_DASHBOARD_HOST", "127.0.0.1"),
        _env("ULMFIT_RAY_DASHBOARD_PORT", str(DASHBOARD_PORT)),
    ]
    container = attempt.container(
        TUNE_CONTAINER,
        single_process_command(attempt.stage.kind.value),
        tune_gpus(tune, attempt.spec),
        ports=_dashboard_port(),
        extra_env=env,
    )
    return _batch_job(attempt, container, ROLE_RAY_HEAD)


def tune_rayjob(attempt: Attempt) -> Body:
    """Backend `rayjob`: a KubeRay RayJob; its cluster is a head plus `workers - 1` workers.

    KubeRay starts Ray in each pod (from `rayStartParams`), submits the entrypoint to the head
    (with RAY_ADDRESS set, so the trainer joins that cluster) and, with
    `shutdownAfterJobFinishes`, deletes the cluster when the sweep ends. Every Ray pod mounts the
    stage config; each gets `resources.cpu/memory/gpusPerWorker`. The head's dashboard must listen
    on the pod network (KubeRay submits and follows the sweep through it); the job's
    NetworkPolicy admits only the job's own pods and the KubeRay operator to it. The submitter pod
    is ours too (`submitter_template`): labelled as the job's, non-root like every other.
    """
    res = attempt.spec.resources
    head_ports = [
        _port("gcs-server", RAY_GCS_PORT),
        _port("client", RAY_CLIENT_PORT),
        *_dashboard_port(),
    ]
    head = attempt.container(RAY_HEAD_CONTAINER, None, res.gpus_per_worker, head_ports)
    start_params = {"num-cpus": _whole_cpus(res.cpu)}
    head_group: Body = {
        "rayStartParams": {**start_params, "dashboard-host": "0.0.0.0"},
        "template": attempt.pod_template(head, ROLE_RAY_HEAD, restart_policy=None),
    }
    ray_cluster: Body = {"headGroupSpec": head_group}
    if res.workers > 1:
        worker = attempt.container(RAY_WORKER_CONTAINER, None, res.gpus_per_worker)
        ray_cluster["workerGroupSpecs"] = [
            {
                "groupName": "workers",
                "replicas": res.workers - 1,
                "minReplicas": res.workers - 1,
                "maxReplicas": res.workers - 1,
                "rayStartParams": dict(start_params),
                "template": attempt.pod_template(worker, restart_policy=None),
            }
        ]
    return {
        "apiVersion": RAYJOB_API_VERSION,
        "kind": RAYJOB_KIND,
        "metadata": attempt.metadata(),
        "spec": _present(
            {
                "entrypoint": " ".join(single_process_command(attempt.stage.kind.value)),
                # Kueue also needs this to manage a RayJob (it refuses one that keeps its cluster).
                "shutdownAfterJobFinishes": True,
                "suspend": True if attempt.queue else None,
                "submitterPodTemplate": submitter_template(attempt),
                "rayClusterSpec": ray_cluster,
            }
        ),
    }


def submitter_template(attempt: Attempt) -> Body:
    """The pod where KubeRay runs `ray job submit` (it fills in the container's command and the
    dashboard address): the trainer image (it has the `ray` CLI), small, non-root."""
    res = attempt.spec.resources
    user = attempt.user_container_parts()
    container = _present(
        {
            "env": [*user["env"], _env("HOME", "/tmp")],
            "envFrom": user["envFrom"],
            "image": res.image,
            "imagePullPolicy": res.image_pull_policy,
            "name": "ray-job-submitter",
            "resources": {
                "limits": {"cpu": "1", "memory": "1Gi"},
                "requests": {"cpu": "100m", "memory": "256Mi"},
            },
            "securityContext": _security_context(),
            # `ray job submit` follows the sweep's log: its tail says why the sweep failed.
            "terminationMessagePolicy": TERMINATION_MESSAGE_POLICY,
            "volumeMounts": [{"mountPath": "/tmp", "name": TMP_VOLUME}, *user["volumeMounts"]],
        }
    )
    volumes = [_empty_dir(TMP_VOLUME, "1Gi")]
    return attempt.pod(container, ROLE_RAY_SUBMITTER, "Never", volumes)


def _whole_cpus(quantity: str) -> str:
    """Ray's `--num-cpus` from a Kubernetes CPU quantity (`500m` -> 1, `2` -> 2)."""
    if quantity.endswith("m"):
        return str(max(1, math.ceil(float(quantity[:-1]) / 1000)))
    return str(max(1, math.ceil(float(quantity))))


def _owned_metadata(owner: Owner, name: str, labels: dict[str, str]) -> Body:
    return {
        "labels": labels,
        "name": name,
        "namespace": owner.namespace,
        "ownerReferences": [owner.owner_reference()],
    }


def dashboard_service(owner: Owner) -> Body:
    """ClusterIP Service on port 8265 in front of the pod with the Ray head (any attempt's)."""
    return {
        "apiVersion": "v1",
        "kind": SERVICE_KIND,
        "metadata": _owned_metadata(
            owner, dashboard_service_name(owner.name), owner.labels(TUNE_KEY)
        ),
        "spec": {
            "ports": [
                {
                    "name": DASHBOARD_PORT_NAME,
                    "port": DASHBOARD_PORT,
                    "protocol": "TCP",
                    "targetPort": DASHBOARD_PORT_NAME,
                }
            ],
            "selector": owner.labels(TUNE_KEY, role=ROLE_RAY_HEAD),
            "type": "ClusterIP",
        },
    }


def network_policy(owner: Owner, s3_port: int, network: PodNetwork) -> Body:
    """The NetworkPolicy around a job's pods (all of them: every stage, attempt and role).

    Ingress: from the job's own pods (torchrun's rendezvous, Ray's head and workers, the RayJob
    submitter), and the Ray dashboard port from the KubeRay operator's pods. Egress: to the job's
    own pods, DNS (port 53, wherever the cluster's resolver is) and the S3 endpoint's port at
    `network.s3_cidrs`. Nothing else: the pods hold the job's S3 keys.
    """

    def own() -> list[Body]:
        return [{"podSelector": {"matchLabels": {LABEL_JOB: owner.name}}}]

    ingress: list[Body] = [{"from": own()}]
    if network.ray_operator_labels:
        ingress.append(
            {
                "from": [
                    {
                        "namespaceSelector": {},
                        "podSelector": {"matchLabels": dict(network.ray_operator_labels)},
                    }
                ],
                "ports": [{"port": DASHBOARD_PORT, "protocol": "TCP"}],
            }
        )
    egress: list[Body] = [
        {"to": own()},
        {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
    ]
    if network.s3_cidrs:
        egress.append(
            {
                "ports": [{"port": s3_port, "protocol": "TCP"}],
                "to": [{"ipBlock": {"cidr": cidr}} for cidr in network.s3_cidrs],
            }
        )
    return {
        "apiVersion": NETWORKPOLICY_API_VERSION,
        "kind": NETWORKPOLICY_KIND,
        "metadata": _owned_metadata(owner, network_policy_name(owner.name), owner.labels()),
        "spec": {
            "egress": egress,
            "ingress": ingress,
            "podSelector": {"matchLabels": {LABEL_JOB: owner.name}},
            "policyTypes": ["Ingress", "Egress"],
        },
    }


def tune_backend(stage: PlannedStage, rayjob_available: bool) -> TuneBackend:
    """`auto` becomes `rayjob` where the RayJob CRD is installed, else `pod`."""
    tune = stage.config.tune
    wanted = tune.backend if tune is not None else TuneBackend.POD
    if wanted == TuneBackend.AUTO:
        return TuneBackend.RAYJOB if rayjob_available else TuneBackend.POD
    return wanted


def child_workload(attempt: Attempt, backend: TuneBackend = TuneBackend.POD) -> Body:
    """The child workload of one attempt (`backend` only matters to a tune stage)."""
    if attempt.stage.kind == StageName.TUNE:
        build = tune_rayjob if backend == TuneBackend.RAYJOB else tune_job
    elif attempt.stage.distributed:
        build = pytorch_job
    else:
        build = evaluate_job
    return build(attempt)
