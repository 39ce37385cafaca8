"""The child bodies, built as plain dicts, are exactly what the typed client models made.

The schema source: the kubernetes client's models (Pods, Jobs, Services, NetworkPolicies,
ConfigMaps) and kubeflow-training's (PyTorchJob). The reference builders below are the operator's
former, model-based ones; `ulmfit_operator.children` builds the same JSON (same keys, same order,
same values) without importing the models. Compared as serialized text, so key order counts too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubeflow.training.configuration import Configuration as KubeflowConfiguration
from kubeflow.training.models import (
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
)
from kubernetes import client as k8s
from ulmfit_operator import children
from ulmfit_operator.api import Metadata, ULMFiTJob, ULMFiTJobSpec, parse_spec
from ulmfit_operator.children import batch, fence, pytorchjob, rayjob, service
from ulmfit_operator.children.batch import (
    EVALUATE_CONTAINER,
    JOB_API_VERSION,
    JOB_KIND,
    TUNE_CONTAINER,
    tune_gpus,
)
from ulmfit_operator.children.common import (
    ANNOTATION_INIT_CHECKPOINT,
    CONFIG_DIR,
    CONFIG_FILE,
    CONFIGMAP_KIND,
    DASHBOARD_PORT,
    DASHBOARD_PORT_NAME,
    LABEL_JOB,
    ROLE_RAY_HEAD,
    RUN_AS_USER,
    Attempt,
    Owner,
    child_name,
    config_map_name,
    dashboard_service_name,
    network_policy_name,
    single_process_command,
    torchrun_command,
)
from ulmfit_operator.children.fence import NETWORKPOLICY_API_VERSION, NETWORKPOLICY_KIND
from ulmfit_operator.children.pytorchjob import (
    PYTORCH_CONTAINER,
    PYTORCH_PORT,
    PYTORCH_PORT_NAME,
    PYTORCHJOB_API_VERSION,
    PYTORCHJOB_KIND,
)
from ulmfit_operator.children.rayjob import (
    RAY_CLIENT_PORT,
    RAY_GCS_PORT,
    RAY_HEAD_CONTAINER,
    RAY_WORKER_CONTAINER,
    RAYJOB_API_VERSION,
    RAYJOB_KIND,
    ROLE_RAY_SUBMITTER,
    _whole_cpus,
)
from ulmfit_operator.children.service import SERVICE_KIND
from ulmfit_operator.plan import TUNE_KEY, PlannedStage, make_plan
from ulmfit_operator.policy import PodNetwork
from ulmfit_trainer.config import StageConfig, StorageSpec

pytestmark = pytest.mark.timeout(120)

# ------------------------------------------------------------------ the reference (model) builders

_SERIALIZER = k8s.ApiClient()
# Each kubeflow model makes its own Configuration unless given one, and every new Configuration
# resets the level of its loggers (which clears the logging cache of the whole process).
_KUBEFLOW = KubeflowConfiguration()


def to_dict(model: Any) -> Any:
    """A kubernetes or kubeflow client model as the plain JSON the API takes.

    The kubeflow models come from an older generator (`attribute_map` holds the JSON names);
    the kubernetes client serializes its own models.
    """
    if model is None or isinstance(model, str | int | float | bool):
        return model
    if isinstance(model, list | tuple):
        return [to_dict(item) for item in model]
    if isinstance(model, dict):
        return {key: to_dict(value) for key, value in model.items() if value is not None}
    attribute_map = getattr(model, "attribute_map", None)
    if isinstance(attribute_map, dict) and hasattr(model, "openapi_types"):
        return {
            attribute_map[name]: to_dict(getattr(model, name))
            for name in model.openapi_types
            if getattr(model, name) is not None
        }
    return _SERIALIZER.sanitize_for_serialization(model)


def model_metadata(
    owner: Owner, name: str, stage: str, attempt: int, annotations: dict[str, str] | None = None
) -> k8s.V1ObjectMeta:
    return k8s.V1ObjectMeta(
        name=name,
        namespace=owner.namespace,
        labels=owner.labels(stage, attempt),
        annotations=annotations or None,
        owner_references=[k8s.V1OwnerReference.model_validate(owner.reference())],
    )


# ------------------------------------------------------------------------------------ builders


def stage_config_map(owner: Owner, child: str, stage: PlannedStage, attempt: int) -> dict[str, Any]:
    """The ConfigMap holding `stage.json` for one attempt."""
    config: StageConfig = stage.config
    text = json.dumps(config.to_wire(), indent=2, sort_keys=True) + "\n"
    body = k8s.V1ConfigMap(
        api_version="v1",
        kind=CONFIGMAP_KIND,
        metadata=model_metadata(owner, config_map_name(child), stage.name, attempt),
        data={CONFIG_FILE: text},
    )
    return to_dict(body)


def storage_env(storage: StorageSpec) -> list[k8s.V1EnvVar]:
    """S3 credentials from the job's Secret, under the variable names the S3 settings read."""
    if storage.s3 is None or not storage.credentials_secret_ref:
        return []
    secret = storage.credentials_secret_ref
    s3 = storage.s3

    def from_secret(variable: str, key: str, optional: bool = False) -> k8s.V1EnvVar:
        return k8s.V1EnvVar(
            name=variable,
            value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(
                    name=secret, key=key, optional=True if optional else None
                )
            ),
        )

    return [
        from_secret(s3.access_key_env, "AWS_ACCESS_KEY_ID"),
        from_secret(s3.secret_key_env, "AWS_SECRET_ACCESS_KEY"),
        from_secret(s3.session_token_env, "AWS_SESSION_TOKEN", optional=True),
    ]


def _security_context() -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


def _pod_security_context() -> k8s.V1PodSecurityContext:
    return k8s.V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=RUN_AS_USER,
        run_as_group=RUN_AS_USER,
        fs_group=RUN_AS_USER,
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
    )


@dataclass(frozen=True)
class ModelAttempt:
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

    def metadata(self) -> k8s.V1ObjectMeta:
        annotations = (
            {ANNOTATION_INIT_CHECKPOINT: self.init_checkpoint} if self.init_checkpoint else {}
        )
        return model_metadata(self.owner, self.name, self.stage.name, self.number, annotations)

    def container(
        self,
        name: str,
        command: list[str] | None,
        gpus: int,
        ports: list[k8s.V1ContainerPort] | None = None,
        extra_env: list[k8s.V1EnvVar] | None = None,
    ) -> k8s.V1Container:
        res = self.spec.resources
        limits = {"cpu": res.cpu, "memory": res.memory}
        if gpus > 0:
            limits["nvidia.com/gpu"] = str(gpus)
        env = [
            k8s.V1EnvVar(name="HOME", value="/tmp"),
            k8s.V1EnvVar(name="XDG_CACHE_HOME", value="/tmp/.cache"),
            k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
            k8s.V1EnvVar(name="ULMFIT_ATTEMPT", value=str(self.number)),
            *(extra_env or []),
            *storage_env(self.spec.storage),
        ]
        return k8s.V1Container(
            name=name,
            image=res.image,
            image_pull_policy=res.image_pull_policy,
            command=command,
            env=env,
            ports=ports or None,
            resources=k8s.V1ResourceRequirements(requests=dict(limits), limits=limits),
            volume_mounts=[
                k8s.V1VolumeMount(name="stage-config", mount_path=CONFIG_DIR, read_only=True),
                k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
                k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
            ],
            security_context=_security_context(),
            termination_message_policy="FallbackToLogsOnError",
        )

    def pod_template(
        self,
        container: k8s.V1Container,
        role: str | None = None,
        restart_policy: str | None = "Never",
    ) -> k8s.V1PodTemplateSpec:
        return k8s.V1PodTemplateSpec(
            metadata=k8s.V1ObjectMeta(labels=self.owner.labels(self.stage.name, self.number, role)),
            spec=k8s.V1PodSpec(
                restart_policy=restart_policy,
                # Pods never talk to the Kubernetes API: progress travels through the store.
                automount_service_account_token=False,
                enable_service_links=False,
                node_selector=dict(self.spec.resources.node_selector) or None,
                security_context=_pod_security_context(),
                containers=[container],
                volumes=[
                    k8s.V1Volume(
                        name="stage-config",
                        config_map=k8s.V1ConfigMapVolumeSource(
                            name=config_map_name(self.name),
                            items=[k8s.V1KeyToPath(key=CONFIG_FILE, path=CONFIG_FILE)],
                        ),
                    ),
                    k8s.V1Volume(
                        name="tmp",
                        empty_dir=k8s.V1EmptyDirVolumeSource(
                            size_limit=self.spec.resources.scratch
                        ),
                    ),
                    # torch's data loaders and NCCL need more shared memory than a container's
                    # 64 MiB.
                    k8s.V1Volume(
                        name="dshm",
                        empty_dir=k8s.V1EmptyDirVolumeSource(
                            medium="Memory", size_limit=self.spec.resources.shared_memory
                        ),
                    ),
                ],
            ),
        )


def pytorch_job(attempt: ModelAttempt) -> dict[str, Any]:
    """The PyTorchJob for one attempt of a distributed stage: 1 Master + (workers - 1) Workers."""
    res = attempt.spec.resources
    command = torchrun_command(attempt.stage.kind.value, res.workers, res.processes_per_worker)
    port = [k8s.V1ContainerPort(name=PYTORCH_PORT_NAME, container_port=PYTORCH_PORT)]

    def replicas(count: int) -> KubeflowOrgV1ReplicaSpec:
        container = attempt.container(PYTORCH_CONTAINER, command, res.gpus_per_worker, port)
        return KubeflowOrgV1ReplicaSpec(
            replicas=count,
            restart_policy="Never",
            template=attempt.pod_template(container),
            local_vars_configuration=_KUBEFLOW,
        )

    replica_specs = {"Master": replicas(1)}
    if res.workers > 1:
        replica_specs["Worker"] = replicas(res.workers - 1)
    job = KubeflowOrgV1PyTorchJob(
        api_version=PYTORCHJOB_API_VERSION,
        kind=PYTORCHJOB_KIND,
        metadata=attempt.metadata(),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(res.processes_per_worker),
            pytorch_replica_specs=replica_specs,
            # Retries are ours (a new attempt that resumes from the store), not pod restarts.
            run_policy=KubeflowOrgV1RunPolicy(
                backoff_limit=0, clean_pod_policy="Running", local_vars_configuration=_KUBEFLOW
            ),
            local_vars_configuration=_KUBEFLOW,
        ),
        local_vars_configuration=_KUBEFLOW,
    )
    return to_dict(job)


def _batch_job(
    attempt: ModelAttempt, container: k8s.V1Container, role: str | None = None
) -> dict[str, Any]:
    job = k8s.V1Job(
        api_version=JOB_API_VERSION,
        kind=JOB_KIND,
        metadata=attempt.metadata(),
        spec=k8s.V1JobSpec(backoff_limit=0, template=attempt.pod_template(container, role)),
    )
    return to_dict(job)


def evaluate_job(attempt: ModelAttempt) -> dict[str, Any]:
    """The batch/v1 Job for one attempt of the single-process `evaluate` stage."""
    gpus = min(attempt.spec.resources.gpus_per_worker, 1)
    command = single_process_command(attempt.stage.kind.value)
    return _batch_job(attempt, attempt.container(EVALUATE_CONTAINER, command, gpus))


def _dashboard_port() -> list[k8s.V1ContainerPort]:
    return [k8s.V1ContainerPort(name=DASHBOARD_PORT_NAME, container_port=DASHBOARD_PORT)]


def tune_job(attempt: ModelAttempt) -> dict[str, Any]:
    """Backend `pod`: a batch/v1 Job whose one pod starts a Ray head and runs the whole sweep.

    Its dashboard listens on the pod's loopback only: the job-submission API behind it has no
    authentication, and nothing but `kubectl port-forward` (which connects inside the pod) needs
    it."""
    tune = attempt.stage.config.tune
    assert tune is not None  # a tune stage's config always carries its sweep
    env = [
        k8s.V1EnvVar(name="ULMFIT_RAY_DASHBOARD_HOST", value="127.0.0.1"),
        k8s.V1EnvVar(name="ULMFIT_RAY_DASHBOARD_PORT", value=str(DASHBOARD_PORT)),
    ]
    container = attempt.container(
        TUNE_CONTAINER,
        single_process_command(attempt.stage.kind.value),
        tune_gpus(tune, attempt.spec),
        ports=_dashboard_port(),
        extra_env=env,
    )
    return _batch_job(attempt, container, ROLE_RAY_HEAD)


def tune_rayjob(attempt: ModelAttempt) -> dict[str, Any]:
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
        k8s.V1ContainerPort(name="gcs-server", container_port=RAY_GCS_PORT),
        k8s.V1ContainerPort(name="client", container_port=RAY_CLIENT_PORT),
        *_dashboard_port(),
    ]
    head = attempt.container(RAY_HEAD_CONTAINER, None, res.gpus_per_worker, head_ports)
    start_params = {"num-cpus": _whole_cpus(res.cpu)}
    head_group: dict[str, Any] = {
        "rayStartParams": {**start_params, "dashboard-host": "0.0.0.0"},
        "template": to_dict(attempt.pod_template(head, ROLE_RAY_HEAD, restart_policy=None)),
    }
    ray_cluster: dict[str, Any] = {"headGroupSpec": head_group}
    if res.workers > 1:
        worker = attempt.container(RAY_WORKER_CONTAINER, None, res.gpus_per_worker)
        ray_cluster["workerGroupSpecs"] = [
            {
                "groupName": "workers",
                "replicas": res.workers - 1,
                "minReplicas": res.workers - 1,
                "maxReplicas": res.workers - 1,
                "rayStartParams": dict(start_params),
                "template": to_dict(attempt.pod_template(worker, restart_policy=None)),
            }
        ]
    return {
        "apiVersion": RAYJOB_API_VERSION,
        "kind": RAYJOB_KIND,
        "metadata": to_dict(attempt.metadata()),
        "spec": {
            "entrypoint": " ".join(single_process_command(attempt.stage.kind.value)),
            "shutdownAfterJobFinishes": True,
            "submitterPodTemplate": to_dict(submitter_template(attempt)),
            "rayClusterSpec": ray_cluster,
        },
    }


def submitter_template(attempt: ModelAttempt) -> k8s.V1PodTemplateSpec:
    """The pod where KubeRay runs `ray job submit` (it fills in the container's command and the
    dashboard address): the trainer image (it has the `ray` CLI), small, non-root."""
    res = attempt.spec.resources
    container = k8s.V1Container(
        name="ray-job-submitter",
        image=res.image,
        image_pull_policy=res.image_pull_policy,
        env=[k8s.V1EnvVar(name="HOME", value="/tmp")],
        resources=k8s.V1ResourceRequirements(
            requests={"cpu": "100m", "memory": "256Mi"}, limits={"cpu": "1", "memory": "1Gi"}
        ),
        volume_mounts=[k8s.V1VolumeMount(name="tmp", mount_path="/tmp")],
        security_context=_security_context(),
        termination_message_policy="FallbackToLogsOnError",
    )
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(
            labels=attempt.owner.labels(attempt.stage.name, attempt.number, ROLE_RAY_SUBMITTER)
        ),
        spec=k8s.V1PodSpec(
            restart_policy="Never",
            automount_service_account_token=False,
            enable_service_links=False,
            node_selector=dict(res.node_selector) or None,
            security_context=_pod_security_context(),
            containers=[container],
            volumes=[
                k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="1Gi"))
            ],
        ),
    )


def dashboard_service(owner: Owner) -> dict[str, Any]:
    """ClusterIP Service on port 8265 in front of the pod with the Ray head (any attempt's)."""
    body = k8s.V1Service(
        api_version="v1",
        kind=SERVICE_KIND,
        metadata=k8s.V1ObjectMeta(
            name=dashboard_service_name(owner.name),
            namespace=owner.namespace,
            labels=owner.labels(TUNE_KEY),
            owner_references=[k8s.V1OwnerReference.model_validate(owner.reference())],
        ),
        spec=k8s.V1ServiceSpec(
            type="ClusterIP",
            selector=owner.labels(TUNE_KEY, role=ROLE_RAY_HEAD),
            ports=[
                k8s.V1ServicePort(
                    name=DASHBOARD_PORT_NAME,
                    port=DASHBOARD_PORT,
                    target_port=DASHBOARD_PORT_NAME,
                    protocol="TCP",
                )
            ],
        ),
    )
    return to_dict(body)


def network_policy(owner: Owner, s3_port: int, network: PodNetwork) -> dict[str, Any]:
    """The NetworkPolicy around a job's pods (all of them: every stage, attempt and role).

    Ingress: from the job's own pods (torchrun's rendezvous, Ray's head and workers, the RayJob
    submitter), and the Ray dashboard port from the KubeRay operator's pods. Egress: to the job's
    own pods, DNS (port 53, wherever the cluster's resolver is) and the S3 endpoint's port at
    `network.s3_cidrs`. Nothing else: the pods hold the job's S3 keys.
    """
    own = [
        k8s.V1NetworkPolicyPeer(
            pod_selector=k8s.V1LabelSelector(match_labels={LABEL_JOB: owner.name})
        )
    ]
    ingress = [k8s.V1NetworkPolicyIngressRule(_from=own)]
    if network.ray_operator_labels:
        ingress.append(
            k8s.V1NetworkPolicyIngressRule(
                _from=[
                    k8s.V1NetworkPolicyPeer(
                        namespace_selector=k8s.V1LabelSelector(),
                        pod_selector=k8s.V1LabelSelector(
                            match_labels=dict(network.ray_operator_labels)
                        ),
                    )
                ],
                ports=[k8s.V1NetworkPolicyPort(protocol="TCP", port=DASHBOARD_PORT)],
            )
        )
    egress = [
        k8s.V1NetworkPolicyEgressRule(to=own),
        k8s.V1NetworkPolicyEgressRule(
            ports=[
                k8s.V1NetworkPolicyPort(protocol="UDP", port=53),
                k8s.V1NetworkPolicyPort(protocol="TCP", port=53),
            ]
        ),
    ]
    if network.s3_cidrs:
        egress.append(
            k8s.V1NetworkPolicyEgressRule(
                to=[
                    k8s.V1NetworkPolicyPeer(ip_block=k8s.V1IPBlock(cidr=cidr))
                    for cidr in network.s3_cidrs
                ],
                ports=[k8s.V1NetworkPolicyPort(protocol="TCP", port=s3_port)],
            )
        )
    body = k8s.V1NetworkPolicy(
        api_version=NETWORKPOLICY_API_VERSION,
        kind=NETWORKPOLICY_KIND,
        metadata=k8s.V1ObjectMeta(
            name=network_policy_name(owner.name),
            namespace=owner.namespace,
            labels=owner.labels(),
            owner_references=[k8s.V1OwnerReference.model_validate(owner.reference())],
        ),
        spec=k8s.V1NetworkPolicySpec(
            pod_selector=k8s.V1LabelSelector(match_labels={LABEL_JOB: owner.name}),
            policy_types=["Ingress", "Egress"],
            ingress=ingress,
            egress=egress,
        ),
    )
    return to_dict(body)


# ------------------------------------------------------------------------------- the comparison

SPACE = {"space": {"learningRate": {"type": "uniform", "low": 0.001, "high": 0.01}}}
STORAGE = {
    "s3": {"endpoint": "http://minio:9000", "bucket": "ulmfit", "accessKeyEnv": "MY_KEY"},
    "credentialsSecretRef": "s3-keys",
}
SPECS: dict[str, dict[str, Any]] = {
    "defaults": {"storage": STORAGE},
    "no-secret": {"storage": {"s3": {"endpoint": "http://minio:9000", "bucket": "bucket"}}},
    "workers-gpus": {
        "storage": STORAGE,
        "resources": {
            "workers": 3,
            "processesPerWorker": 2,
            "gpusPerWorker": 2,
            "cpu": "1500m",
            "memory": "12Gi",
            "image": "registry.example/trainer:1",
            "imagePullPolicy": "Always",
            "nodeSelector": {"pool": "gpu", "zone": "a"},
            "scratch": "5Gi",
            "sharedMemory": "512Mi",
        },
        "stages": {"tune": {**SPACE, "gpusPerTrial": 0.5, "concurrentTrials": 3}},
    },
    "two-workers-tune": {
        "storage": STORAGE,
        "resources": {"workers": 2, "cpu": "500m"},
        "stages": {"tune": {**SPACE, "backend": "rayjob"}},
    },
}
OWNERS = [Owner("topics", "team", "uid-1"), Owner("9" + "x" * 60, "ns", "uid-2")]
NETWORKS = [
    PodNetwork(),
    PodNetwork(s3_cidrs=(), ray_operator_labels=()),
    PodNetwork(
        s3_cidrs=("10.0.0.0/8",),
        ray_operator_labels=(("app.kubernetes.io/name", "kuberay-operator"), ("x", "y")),
    ),
]


def text(body: Any) -> str:
    return json.dumps(body)


def planned(spec: dict[str, Any], name: str) -> tuple[ULMFiTJobSpec, Any]:
    parsed = parse_spec(spec)
    job = ULMFiTJob(metadata=Metadata(name=name, namespace="team"), spec=parsed)
    assert parsed.storage.s3 is not None
    return parsed, make_plan(job, parsed.storage.s3.root, parsed.storage.s3)


@pytest.mark.parametrize("owner", OWNERS, ids=["short", "long"])
@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_operator_every_child_matches_the_model_built_body(owner: Owner, spec_name: str) -> None:
    spec, plan = planned(SPECS[spec_name], owner.name)
    built = 0
    for stage in plan.stages:
        for number, init in ((1, None), (3, "s3://ulmfit/x/final")):
            new = Attempt(owner, stage, spec, number, init_checkpoint=init)
            old = ModelAttempt(owner, stage, spec, number, init_checkpoint=init)
            child = new.name
            assert text(children.stage_config_map(owner, child, stage, number)) == text(
                stage_config_map(owner, child, stage, number)
            )
            if stage.name == TUNE_KEY:
                pairs = [
                    (batch.tune_job(new), tune_job(old)),
                    (rayjob.tune_rayjob(new), tune_rayjob(old)),
                    (rayjob.submitter_template(new), to_dict(submitter_template(old))),
                ]
            elif stage.distributed:
                pairs = [(pytorchjob.pytorch_job(new), pytorch_job(old))]
            else:
                pairs = [(batch.evaluate_job(new), evaluate_job(old))]
            for plain, model in pairs:
                assert text(plain) == text(model)
                built += 1
    assert built >= 2 * len(plan.stages)
    assert text(service.dashboard_service(owner)) == text(dashboard_service(owner))
    for network in NETWORKS:
        for port in (9000, 443):
            assert text(fence.network_policy(owner, port, network)) == text(
                network_policy(owner, port, network)
            )


def test_operator_plan_covers_every_child_kind() -> None:
    """The specs above build each kind: PyTorchJob with workers, evaluate and tune Jobs, RayJob."""
    spec, plan = planned(SPECS["workers-gpus"], "topics")
    owner = OWNERS[0]
    kinds = set()
    for stage in plan.stages:
        body = children.child_workload(Attempt(owner, stage, spec, 1))
        kinds.add(body["kind"])
        if body["kind"] == "PyTorchJob":
            assert "Worker" in body["spec"]["pytorchReplicaSpecs"]
    assert kinds == {"PyTorchJob", "Job"}
    assert any(stage.name == TUNE_KEY for stage in plan.stages)


def test_operator_workloads_import_no_model_classes() -> None:
    sources = sorted(Path(children.__file__).parent.glob("*.py"))
    assert {"__init__.py", "common.py", "pytorchjob.py"} <= {source.name for source in sources}
    for source in sources:
        code = source.read_text()
        assert "import kubeflow" not in code and "from kubeflow" not in code, source.name
        assert "from kubernetes" not in code and "import kubernetes" not in code, source.name
