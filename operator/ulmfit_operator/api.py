"""The ULMFiTJob API: spec and status models, the one source of the CRD schema.

Field docstrings become the CRD's descriptions (see `crd.py`), defaults become its defaults, and
validation messages name the wire (camelCase) path of the field and the value that was given.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator
from ulmfit_trainer.config import (
    DNS_LABEL,
    DataSpec,
    DeepSpeedSpec,
    HeadKind,
    ModelFamily,
    ModelSpec,
    Precision,
    StagesSpec,
    StorageSpec,
    TokenizerSpec,
    WireModel,
)
from ulmfit_trainer.errors import InvalidSpec

from ulmfit_operator.pod_overrides import (
    DNS_SUBDOMAIN,
    QUANTITY_PATTERN,
    PodTemplateOverrides,
)

GROUP = "ulmfit.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ULMFiTJob"
PLURAL = "ulmfitjobs"
SINGULAR = "ulmfitjob"
SHORT_NAMES = ["ulmfit", "uj"]

DEFAULT_TRAINER_IMAGE = "ghcr.io/ulmfit-operator/trainer:0.1.0"


class TrainingBackend(StrEnum):
    """The kind of child a distributed stage runs as."""

    AUTO = "auto"
    """TrainJob where the cluster serves it, else PyTorchJob."""
    TRAINJOB = "trainjob"
    """Kubeflow Trainer v2: `trainer.kubeflow.org/v1alpha1` TrainJob (runs as a JobSet)."""
    PYTORCHJOB = "pytorchjob"
    """The Kubeflow Training Operator v1: `kubeflow.org/v1` PyTorchJob."""


class SchedulingPolicy(WireModel):
    """Gang scheduling of a distributed stage (the PyTorchJob's `runPolicy.schedulingPolicy`,
    read by the Training Operator when it runs with a gang scheduler: Volcano or the
    scheduler-plugins coscheduler; set `resources.podTemplate.schedulerName` to match). A stage
    then starts all its pods or none: no half-started rendezvous holding GPUs."""

    min_available: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Pods that must be placed together before any starts. Default: all of the stage's pods
    (`resources.workers`), which torchrun's static rendezvous needs; at most that."""
    queue: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)] | None = None
    """The gang scheduler's queue (a Volcano Queue). Not Kueue's: that is `spec.queueName`."""
    priority_class: (
        Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)] | None
    ) = None
    """The PriorityClass of the pod group."""
    schedule_timeout_seconds: Annotated[int, Field(ge=1, le=2_147_483_647)] | None = None
    """How long the scheduler tries to place the whole group before giving up (seconds)."""


class ResourcesSpec(WireModel):
    """What each training stage runs on."""

    workers: Annotated[int, Field(ge=1, le=1024)] = 1
    """Pods (nodes) per distributed stage; the first is the PyTorchJob master."""
    processes_per_worker: Annotated[int, Field(ge=1, le=64)] = 1
    """Training processes per pod (torchrun `--nproc-per-node`); on GPU usually one per GPU."""
    gpus_per_worker: Annotated[int, Field(ge=0, le=64)] = 0
    """GPUs requested per pod (`nvidia.com/gpu`). 0 trains on CPU with gloo."""
    cpu: Annotated[str, Field(pattern=QUANTITY_PATTERN)] = "2"
    """CPU request and limit per pod (a Kubernetes quantity)."""
    memory: Annotated[str, Field(pattern=QUANTITY_PATTERN)] = "8Gi"
    """Memory request and limit per pod (a Kubernetes quantity)."""
    image: Annotated[str, Field(min_length=1, max_length=512)] = DEFAULT_TRAINER_IMAGE
    """Trainer container image (the Dockerfile's `trainer` target)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Kubernetes image pull policy for trainer pods."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels trainer pods must match (e.g. a GPU node pool)."""
    scratch: Annotated[str, Field(pattern=QUANTITY_PATTERN)] = "20Gi"
    """Size limit of each pod's scratch space `/tmp` (home, caches, Ray's session files): an
    emptyDir on the node's disk; a pod that writes more is evicted."""
    shared_memory: Annotated[str, Field(pattern=QUANTITY_PATTERN)] = "2Gi"
    """Size limit of each pod's `/dev/shm` (memory-backed, so it counts against `memory`):
    torch's data loaders, NCCL and Ray's object store use it."""
    pod_template: PodTemplateOverrides | None = None
    """Labels, annotations, tolerations, affinity, priority, scheduler, ServiceAccount, image pull
    secrets, volumes and env added to every pod of the job (see `PodTemplateOverrides`)."""
    training_backend: TrainingBackend | None = None
    """What the distributed stages run as: `trainjob` (Kubeflow Trainer v2 TrainJob),
    `pytorchjob` (Kubeflow Training Operator v1 PyTorchJob) or `auto` (TrainJob where the cluster
    serves it, else PyTorchJob). Default: the operator's `--training-backend` (itself `auto`
    unless set). A backend whose CRD the cluster does not serve fails the job (InvalidSpec)."""

    @model_validator(mode="after")
    def _processes_fit_gpus(self) -> ResourcesSpec:
        if self.gpus_per_worker and self.processes_per_worker > self.gpus_per_worker:
            raise ValueError(
                f"processesPerWorker {self.processes_per_worker} exceeds gpusPerWorker "
                f"{self.gpus_per_worker}: one training process per GPU at most"
            )
        return self


class RunPolicySpec(WireModel):
    """Retries, deadlines and clean-up, as in Kubeflow's run policy."""

    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """Failed attempts allowed per stage before the job fails; each retry resumes from the
    stage's latest checkpoint."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Fail the job when it has been running longer than this (seconds). Default: no limit."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete the finished job (and its children) this many seconds after it ends. Checkpoints
    and the exported model stay in the store. Default: keep."""
    progress_deadline_seconds: Annotated[int, Field(ge=30)] = 1800
    """A running stage whose `progress.json` has not changed for this long counts as stuck and is
    restarted (uses one attempt of `backoffLimit`)."""
    suspend: bool = False
    """Suspend the job: running children are deleted, checkpoints kept; set back to false to
    resume from the last checkpoint."""
    pending_deadline_seconds: Annotated[int, Field(ge=30)] | None = 900
    """An attempt whose pods have not all started this many seconds after it was created (or,
    under a queue, admitted) is stopped and counted against `backoffLimit`: an unschedulable pod,
    an image that cannot be pulled, a missing Secret. The pods' own reasons go into the stage's
    message and an Event. Time spent waiting in a queue does not count. null: wait forever."""
    scheduling_policy: SchedulingPolicy | None = None
    """Gang scheduling of the distributed stages (all pods or none). Default: none, each pod is
    scheduled on its own."""


class ULMFiTJobSpec(WireModel):
    """A ULMFiT text classifier: data, model, the stages to run and where they run."""

    data: DataSpec = Field(default_factory=DataSpec)
    """Training, validation, test and unlabeled text."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """The language-model backbone."""
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    """The tokenizer (trained on the corpus when none is given)."""
    stages: StagesSpec = Field(default_factory=StagesSpec)
    """The ULMFiT stages and their hyperparameters."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Pods, processes and GPUs per training stage."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    """DeepSpeed settings shared by every training stage."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Checkpoint and artifact storage."""
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec)
    """Retries, deadlines, suspension and clean-up."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 42
    """Seed for sampling, shuffling and initialization: the same spec trains the same model."""
    queue_name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)] | None = None
    """Kueue LocalQueue (in the job's namespace) that admits this job's children: each is
    created suspended with the `kueue.x-k8s.io/queue-name` label and starts when Kueue admits it;
    while it waits it counts against no deadline or retry. The same label on the ULMFiTJob
    itself works too. Default: no queue, children start at once."""

    @model_validator(mode="after")
    def _sequences_fit_the_model(self) -> ULMFiTJobSpec:
        context = self.model.architecture.context_length
        if self.model.pretrained is None and self.data.max_length > context:
            raise ValueError(
                f"data.maxLength {self.data.max_length} exceeds "
                f"model.architecture.contextLength {context}"
            )
        return self

    @model_validator(mode="after")
    def _heads_fit_the_family(self) -> ULMFiTJobSpec:
        family = self.model.family
        if family == ModelFamily.CAUSAL:
            return self
        cotrain = self.stages.cotrain
        heads = [("stages.classifier.head", self.stages.classifier.head)]
        if cotrain is not None and cotrain.classifier is not None:
            heads.append(("stages.cotrain.classifier.head", cotrain.classifier.head))
        for field, head in heads:
            if head == HeadKind.GENERATIVE:
                raise ValueError(
                    f"{field} '{head.value}' needs a causal LM, but model.family is "
                    f"'{family.value}': use the concat, attention or hierarchical head"
                )
        return self

    @model_validator(mode="after")
    def _gang_fits_the_workers(self) -> ULMFiTJobSpec:
        gang = self.run_policy.scheduling_policy
        workers = self.resources.workers
        if gang is not None and gang.min_available is not None and gang.min_available > workers:
            raise ValueError(
                f"runPolicy.schedulingPolicy.minAvailable {gang.min_available} exceeds "
                f"resources.workers {workers}"
            )
        return self

    @model_validator(mode="after")
    def _env_leaves_the_credentials(self) -> ULMFiTJobSpec:
        pod, s3 = self.resources.pod_template, self.storage.s3
        if pod is None or s3 is None:
            return self
        credentials = (s3.access_key_env, s3.secret_key_env, s3.session_token_env)
        for variable in pod.env:
            if variable.name in credentials:
                raise ValueError(
                    f"resources.podTemplate.env: name '{variable.name}' is the S3 credential "
                    "variable of storage.s3"
                )
        return self

    @model_validator(mode="after")
    def _precision_fits_the_device(self) -> ULMFiTJobSpec:
        precision = self.deepspeed.precision
        if precision == Precision.FP16 and self.resources.gpus_per_worker == 0:
            raise ValueError(
                f"deepspeed.precision '{precision.value}' needs GPUs, but "
                f"resources.gpusPerWorker is {self.resources.gpus_per_worker}: on CPU use bf16 "
                "or fp32"
            )
        return self


class Metadata(WireModel):
    """The subset of ObjectMeta the runners read."""

    model_config = ConfigDict(**{**WireModel.model_config, "extra": "ignore"})

    name: Annotated[
        str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    ]
    """Job name (a DNS label: children are named after it)."""
    namespace: str = "default"
    """Namespace of the job."""
    uid: Annotated[str, Field(max_length=128, pattern=r"^[-0-9A-Za-z]*$")] | None = None
    """UID the API server gave this instance of the job (none in the local runner): part of its
    store path, so a job re-created under the same name starts afresh."""


class ULMFiTJob(WireModel):
    """A whole `ULMFiTJob` document as `kubectl apply` takes it."""

    model_config = ConfigDict(**{**WireModel.model_config, "extra": "ignore"})

    api_version: Literal["ulmfit.io/v1alpha1"] = Field("ulmfit.io/v1alpha1", alias="apiVersion")
    kind: Literal["ULMFiTJob"] = "ULMFiTJob"
    metadata: Metadata
    spec: ULMFiTJobSpec = Field(default_factory=ULMFiTJobSpec)

    @property
    def run_id(self) -> str:
        """Where this job's objects live in the store (its run path, below the store root).

        In the cluster, `<namespace>/<name>/<uid>`: each instance of a job owns its path, so a
        job deleted and re-created under the same name neither resumes nor counts as finished
        what the earlier one committed (its checkpoints stay where they were). Without a UID
        (the local runner, `ulmfit run`), `<namespace>/<name>`: a rerun of the same job file
        resumes by name, which is the local runner's contract.
        """
        run = f"{self.metadata.namespace}/{self.metadata.name}"
        return f"{run}/{self.metadata.uid}" if self.metadata.uid else run


KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""Kueue's label naming the LocalQueue that admits a workload."""


def queue_name(spec: ULMFiTJobSpec, labels: Mapping[str, str] | None) -> str | None:
    """The Kueue LocalQueue for the job's children: `spec.queueName`, else the job's own
    `kueue.x-k8s.io/queue-name` label; None when the job is not queued."""
    if spec.queue_name:
        return spec.queue_name
    label = (labels or {}).get(KUEUE_QUEUE_LABEL)
    return label or None


class StageState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"


def parse_job(document: Mapping[str, Any]) -> ULMFiTJob:
    """Validate one ULMFiTJob document; every problem names its field path and value."""
    try:
        return ULMFiTJob.model_validate(document)
    except ValidationError as error:
        raise InvalidSpec([_problem(item) for item in error.errors()]) from None


def parse_spec(spec: Mapping[str, Any]) -> ULMFiTJobSpec:
    """Validate a bare spec (what the operator reads from the cluster object)."""
    try:
        return ULMFiTJobSpec.model_validate(spec)
    except ValidationError as error:
        raise InvalidSpec([_problem(item, prefix="spec") for item in error.errors()]) from None


def load_job_file(text: str) -> ULMFiTJob:
    """Pick the ULMFiTJob out of a (possibly multi-document) YAML file and validate it.

    Other documents (a Secret for the store, say) are ignored, so one file serves both
    `kubectl apply -f` and `ulmfit run`.
    """
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise InvalidSpec([("", "<yaml>", f"not valid YAML: {error}")]) from None
    jobs = [doc for doc in documents if isinstance(doc, dict) and doc.get("kind") == KIND]
    if len(jobs) != 1:
        kinds = [
            doc.get("kind") if isinstance(doc, dict) else type(doc).__name__ for doc in documents
        ]
        raise InvalidSpec([("kind", kinds, f"expected exactly one {KIND} document")])
    return parse_job(jobs[0])


def _problem(item: Any, prefix: str = "") -> tuple[str, object, str]:
    path = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
    message = item["msg"].removeprefix("Value error, ")
    value = item.get("input")
    if item["type"] == "extra_forbidden":
        message = "unknown field"
    if item["type"] == "missing":
        value = None
    return path, value, message
