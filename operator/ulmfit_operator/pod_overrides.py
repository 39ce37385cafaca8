"""Pod settings a job may add to every pod it runs (`spec.resources.podTemplate`).

A typed, safe subset of the Kubernetes pod spec: what a shared cluster asks of a pod (labels,
tolerations, affinity, a priority class, a scheduler, volumes, env), never what would undo the
operator's hardening (security contexts, host paths, the API token) or break what it relies on
(its labels, volumes, mounts and env). Part of the API models (`api.py`), so the CRD schema and
the README reference come from here too.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator
from ulmfit_trainer.config import DNS_LABEL, WireModel

# Kubernetes quantities: plain or suffixed numbers such as "500m", "2", "8Gi".
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


# ------------------------------------------------------------------------- pod-template overrides
#
# A typed, safe subset of the Kubernetes pod spec (`resources.podTemplate`): what a shared
# cluster asks of a pod (labels, tolerations, affinity, a priority class, a scheduler, volumes,
# env), never what would undo the operator's hardening (security contexts, host paths, the API
# token) or break what it relies on (its labels, volumes, mounts and env).

LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
"""A label or annotation key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
characters (alphanumerics, `-`, `_`, `.`; alphanumeric at both ends)."""
LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
"""A label value: empty, or at most 63 characters, alphanumeric at both ends."""
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
"""A Kubernetes object name (Secret, ConfigMap, PVC, ServiceAccount, PriorityClass)."""
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
"""An environment variable name, as Kubernetes accepts it."""
MOUNT_PATH = r"^(/\.?[A-Za-z0-9_-][A-Za-z0-9._-]*)+$"
"""An absolute path without `.` or `..` segments, empty segments or a trailing slash."""
SUB_PATH = r"^\.?[A-Za-z0-9_-][A-Za-z0-9._-]*(/\.?[A-Za-z0-9_-][A-Za-z0-9._-]*)*$"
"""A relative path inside a volume, without `.` or `..` segments."""

INTEGER = r"^[0-9]+$"

OPERATOR_LABEL_PREFIX = "ulmfit.io/"
OPERATOR_LABELS = ("app.kubernetes.io/managed-by", "kueue.x-k8s.io/queue-name")
"""Pod labels the operator owns besides its `ulmfit.io/` ones: it finds its pods by them, and
the queue is the job's (`queueName`), not a pod's."""
OPERATOR_VOLUMES = ("stage-config", "tmp", "dshm")
"""The volumes every pod of a job already has (the stage config, `/tmp`, `/dev/shm`)."""
OPERATOR_MOUNT_PATHS = ("/etc/ulmfit", "/tmp", "/dev/shm", "/dev/termination-log")
"""Where the operator (and the kubelet) mount into the trainer's containers."""
SEALED_MOUNT_PATHS = ("/etc/ulmfit", "/dev")
"""Trees nothing may be mounted into: the stage config, and the container's devices (where
`/dev/shm` and the termination log live)."""
OPERATOR_ENV = (
    "HOME",
    "XDG_CACHE_HOME",
    "PYTHONUNBUFFERED",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "RAY_ADDRESS",
    "RAY_IP",
    "RAY_PORT",
    "RAY_CLUSTER_NAME",
    "RAY_DASHBOARD_ADDRESS",
    "RAY_JOB_SUBMISSION_ID",
)
"""Environment variables the operator, the Training Operator or KubeRay set in the trainer's
containers; together with every `ULMFIT_*` and `PET_*` name (the trainer's and torchrun's own)
and the S3 credential variables (`storage.s3.accessKeyEnv` and friends)."""
OPERATOR_ENV_PREFIXES = ("ULMFIT_", "PET_")
MAX_ITEMS = 64
"""Bound of every list in the overrides (the API server prices CEL rules by list size)."""


def _mount_path_problem(path: str) -> str | None:
    """Why `path` may not be a user's mount path (None when it may)."""
    for reserved in OPERATOR_MOUNT_PATHS:
        if reserved == path or reserved.startswith(path + "/"):
            return f"would hide the operator's mount {reserved}"
    for tree in SEALED_MOUNT_PATHS:
        if path.startswith(tree + "/"):
            return f"is inside {tree}, where nothing may be mounted"
    return None


def _label_key_problem(key: str) -> str | None:
    if key.startswith(OPERATOR_LABEL_PREFIX) or key in OPERATOR_LABELS:
        return "is the operator's own label"
    return None


def _env_problem(name: str) -> str | None:
    if name in OPERATOR_ENV or name.startswith(OPERATOR_ENV_PREFIXES):
        return "is set by the operator"
    return None


class Toleration(WireModel):
    """Lets the pods run on nodes with a matching taint (Kubernetes `Toleration`)."""

    key: Annotated[str, Field(max_length=317, pattern=LABEL_KEY)] | None = None
    """The taint key to tolerate. Empty (with operator `Exists`) tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal` matches the taint's value; `Exists` matches any value (and takes none)."""
    value: Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)] | None = None
    """The taint value, with operator `Equal`."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The taint effect to tolerate. Default: every effect."""
    toleration_seconds: Annotated[int, Field(ge=0, le=31_536_000)] | None = None
    """With effect `NoExecute`: how long the pod stays on a node after the taint appears
    (seconds). Default: forever."""

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError(f"value '{self.value}' must be empty when operator is Exists")
        if not self.key and self.operator != "Exists":
            raise ValueError(f"operator '{self.operator}' needs a key: an empty key needs Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(
                f"tolerationSeconds {self.toleration_seconds} needs effect NoExecute "
                f"(got {self.effect})"
            )
        return self


class NodeSelectorRequirement(WireModel):
    """A node label (or field) compared with values."""

    key: Annotated[str, Field(min_length=1, max_length=317)]
    """The node label key (for `matchFields`: `metadata.name`)."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    """How the label's value relates to `values`: `In`/`NotIn` a set, `Exists`/`DoesNotExist`
    (no values), `Gt`/`Lt` one integer."""
    values: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=MAX_ITEMS)] = (
        Field(default_factory=list)
    )
    """The values to compare with."""

    @model_validator(mode="after")
    def _values_fit_operator(self) -> NodeSelectorRequirement:
        count = len(self.values)
        if self.operator in ("In", "NotIn") and count == 0:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and count:
            raise ValueError(f"operator {self.operator} takes no values (got {count})")
        if self.operator in ("Gt", "Lt") and (
            count != 1 or not re.fullmatch(INTEGER, self.values[0])
        ):
            raise ValueError(f"operator {self.operator} needs exactly one integer value")
        return self


class NodeSelectorTerm(WireModel):
    """Nodes that match every requirement of the term."""

    match_expressions: Annotated[list[NodeSelectorRequirement], Field(max_length=MAX_ITEMS)] = (
        Field(default_factory=list)
    )
    """Requirements on the node's labels."""
    match_fields: Annotated[list[NodeSelectorRequirement], Field(max_length=MAX_ITEMS)] = Field(
        default_factory=list
    )
    """Requirements on the node's fields (`metadata.name`)."""


class NodeSelector(WireModel):
    """Nodes that match any of the terms."""

    node_selector_terms: Annotated[
        list[NodeSelectorTerm], Field(min_length=1, max_length=MAX_ITEMS)
    ]
    """The terms, ORed."""


class PreferredSchedulingTerm(WireModel):
    """A node preference with a weight."""

    weight: Annotated[int, Field(ge=1, le=100)]
    """How much matching nodes are preferred (1-100)."""
    preference: NodeSelectorTerm
    """The nodes preferred."""


class NodeAffinity(WireModel):
    """Which nodes the pods run on (Kubernetes `NodeAffinity`)."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    """Nodes the pods must run on."""
    preferred_during_scheduling_ignored_during_execution: Annotated[
        list[PreferredSchedulingTerm], Field(max_length=MAX_ITEMS)
    ] = Field(default_factory=list)
    """Nodes the scheduler prefers, by weight."""


class LabelSelectorRequirement(WireModel):
    """A label compared with a set of values."""

    key: Annotated[str, Field(max_length=317, pattern=LABEL_KEY)]
    """The label key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """`In`/`NotIn` the values, or `Exists`/`DoesNotExist` (no values)."""
    values: Annotated[
        list[Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
        Field(max_length=MAX_ITEMS),
    ] = Field(default_factory=list)
    """The values to compare with."""

    @model_validator(mode="after")
    def _values_fit_operator(self) -> LabelSelectorRequirement:
        count = len(self.values)
        if self.operator in ("In", "NotIn") and count == 0:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and count:
            raise ValueError(f"operator {self.operator} takes no values (got {count})")
        return self


class LabelSelector(WireModel):
    """Objects whose labels match every label and requirement (Kubernetes `LabelSelector`)."""

    match_labels: Annotated[
        dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
        Field(max_length=MAX_ITEMS),
    ] = Field(default_factory=dict)
    """Labels that must have exactly these values."""
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=MAX_ITEMS)] = (
        Field(default_factory=list)
    )
    """Requirements on the labels."""


class PodAffinityTerm(WireModel):
    """Pods (matched by labels) whose topology domain (node, zone) this pod shares or avoids."""

    label_selector: LabelSelector | None = None
    """The pods this term is about."""
    namespaces: Annotated[
        list[Annotated[str, Field(max_length=63, pattern=DNS_LABEL)]],
        Field(max_length=MAX_ITEMS),
    ] = Field(default_factory=list)
    """Namespaces of those pods. Default (with no `namespaceSelector`): the job's."""
    namespace_selector: LabelSelector | None = None
    """Namespaces of those pods, by label (`{}`: every namespace)."""
    topology_key: Annotated[str, Field(min_length=1, max_length=317, pattern=LABEL_KEY)]
    """The node label that defines a domain: `kubernetes.io/hostname` (a node),
    `topology.kubernetes.io/zone` (a zone)."""


class WeightedPodAffinityTerm(WireModel):
    """A pod (anti-)affinity preference with a weight."""

    weight: Annotated[int, Field(ge=1, le=100)]
    """How much the term counts (1-100)."""
    pod_affinity_term: PodAffinityTerm
    """The term."""


class PodAffinity(WireModel):
    """Pods to run next to (`podAffinity`) or away from (`podAntiAffinity`)."""

    required_during_scheduling_ignored_during_execution: Annotated[
        list[PodAffinityTerm], Field(max_length=MAX_ITEMS)
    ] = Field(default_factory=list)
    """Terms every placement must satisfy."""
    preferred_during_scheduling_ignored_during_execution: Annotated[
        list[WeightedPodAffinityTerm], Field(max_length=MAX_ITEMS)
    ] = Field(default_factory=list)
    """Terms the scheduler prefers, by weight."""


class Affinity(WireModel):
    """Node affinity and pod (anti-)affinity of the job's pods (Kubernetes `Affinity`)."""

    node_affinity: NodeAffinity | None = None
    """Which nodes the pods run on."""
    pod_affinity: PodAffinity | None = None
    """Pods to share a node or zone with."""
    pod_anti_affinity: PodAffinity | None = None
    """Pods to keep away from (e.g. spread the workers over nodes)."""


class KeyFromObject(WireModel):
    """One key of a Secret or ConfigMap in the job's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
    """The Secret's or ConfigMap's name."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
    """The key."""
    optional: bool | None = None
    """Start the pod even when the object or key is missing. Default: do not."""


class FieldRef(WireModel):
    """A field of the pod itself (Kubernetes downward API)."""

    field_path: Literal[
        "metadata.name",
        "metadata.namespace",
        "metadata.uid",
        "spec.nodeName",
        "spec.serviceAccountName",
        "status.hostIP",
        "status.podIP",
    ]
    """The field."""


class EnvVarSource(WireModel):
    """Where a variable's value comes from: exactly one of the three."""

    secret_key_ref: KeyFromObject | None = None
    """A key of a Secret."""
    config_map_key_ref: KeyFromObject | None = None
    """A key of a ConfigMap."""
    field_ref: FieldRef | None = None
    """A field of the pod."""

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        given = [
            name
            for name, value in (
                ("secretKeyRef", self.secret_key_ref),
                ("configMapKeyRef", self.config_map_key_ref),
                ("fieldRef", self.field_ref),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of secretKeyRef, configMapKeyRef, fieldRef "
                f"(got {', '.join(given) or 'none'})"
            )
        return self


class EnvVar(WireModel):
    """An environment variable of the job's containers."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=ENV_NAME)]
    """The variable. The operator's own (`HOME`, `XDG_CACHE_HOME`, `PYTHONUNBUFFERED`, `ULMFIT_*`,
    torchrun's `PET_*`, `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, KubeRay's
    `RAY_ADDRESS` and friends, the S3 credential variables) are refused."""
    value: Annotated[str, Field(max_length=32768)] | None = None
    """The value (`$(VAR)` expands another variable)."""
    value_from: EnvVarSource | None = None
    """The value, from a Secret, a ConfigMap or the pod."""

    @model_validator(mode="after")
    def _one_value(self) -> EnvVar:
        problem = _env_problem(self.name)
        if problem:
            raise ValueError(f"name '{self.name}' {problem}")
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"variable '{self.name}': give value or valueFrom, not both")
        return self


class ObjectRef(WireModel):
    """A Secret or ConfigMap in the job's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
    """Its name."""
    optional: bool | None = None
    """Start the pod even when it is missing. Default: do not."""


class EnvFromSource(WireModel):
    """Every key of a Secret or ConfigMap as environment variables: exactly one of the two.
    A key with the name of one of the operator's variables does not replace it (a container's
    own `env` wins in Kubernetes)."""

    prefix: Annotated[str, Field(max_length=253, pattern=ENV_NAME)] | None = None
    """Put in front of every key."""
    secret_ref: ObjectRef | None = None
    """The Secret."""
    config_map_ref: ObjectRef | None = None
    """The ConfigMap."""

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvFromSource:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("give exactly one of secretRef, configMapRef")
        return self


class KeyToPath(WireModel):
    """A key of a Secret or ConfigMap projected to a file."""

    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
    """The key."""
    path: Annotated[str, Field(max_length=253, pattern=SUB_PATH)]
    """The file, relative to the mount path."""


class ConfigMapVolume(WireModel):
    """A ConfigMap's keys as files."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
    """The ConfigMap."""
    items: Annotated[list[KeyToPath], Field(max_length=MAX_ITEMS)] = Field(default_factory=list)
    """The keys to project (default: all, each to a file named after it)."""
    optional: bool | None = None
    """Start the pod even when the ConfigMap is missing. Default: do not."""


class SecretVolume(WireModel):
    """A Secret's keys as files."""

    secret_name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
    """The Secret."""
    items: Annotated[list[KeyToPath], Field(max_length=MAX_ITEMS)] = Field(default_factory=list)
    """The keys to project (default: all, each to a file named after it)."""
    optional: bool | None = None
    """Start the pod even when the Secret is missing. Default: do not."""


class PersistentVolumeClaimVolume(WireModel):
    """A PersistentVolumeClaim in the job's namespace."""

    claim_name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
    """The claim."""
    read_only: bool | None = None
    """Mount it read-only. Default: read-write."""


class EmptyDirVolume(WireModel):
    """Scratch space that lives as long as the pod."""

    medium: Literal["", "Memory"] | None = None
    """`Memory` for a tmpfs (counts against the container's memory). Default: the node's disk."""
    size_limit: Annotated[str, Field(pattern=QUANTITY_PATTERN)]
    """The most it may hold (a Kubernetes quantity); a pod that writes more is evicted. Required:
    an unbounded emptyDir can fill the node's disk."""


class Volume(WireModel):
    """A volume of the job's pods: exactly one of a PersistentVolumeClaim, a ConfigMap, a
    Secret or an emptyDir (host paths and other sources are not offered)."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
    """The volume's name, for `volumeMounts`. `stage-config`, `tmp` and `dshm` are the
    operator's."""
    persistent_volume_claim: PersistentVolumeClaimVolume | None = None
    """A PersistentVolumeClaim (a shared dataset or cache, say)."""
    config_map: ConfigMapVolume | None = None
    """A ConfigMap's keys as files."""
    secret: SecretVolume | None = None
    """A Secret's keys as files."""
    empty_dir: EmptyDirVolume | None = None
    """Scratch space for the pod's lifetime."""

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        if self.name in OPERATOR_VOLUMES:
            raise ValueError(f"name '{self.name}' is the operator's own volume")
        given = [
            name
            for name, value in (
                ("persistentVolumeClaim", self.persistent_volume_claim),
                ("configMap", self.config_map),
                ("secret", self.secret),
                ("emptyDir", self.empty_dir),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"volume '{self.name}': give exactly one of persistentVolumeClaim, configMap, "
                f"secret, emptyDir (got {', '.join(given) or 'none'})"
            )
        return self


class VolumeMount(WireModel):
    """Where a volume of `podTemplate.volumes` appears in the job's containers."""

    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
    """The volume (declared in `podTemplate.volumes`)."""
    mount_path: Annotated[str, Field(min_length=2, max_length=1024, pattern=MOUNT_PATH)]
    """The absolute path to mount at. It may not hide the operator's mounts (`/etc/ulmfit`,
    `/tmp`, `/dev/shm`, `/dev/termination-log`: neither those paths nor a parent such as `/etc`)
    or sit inside `/etc/ulmfit` or `/dev`; below `/tmp` is fine."""
    read_only: bool | None = None
    """Mount it read-only. Default: read-write."""
    sub_path: Annotated[str, Field(max_length=1024, pattern=SUB_PATH)] | None = None
    """Mount this path inside the volume instead of its root."""

    @model_validator(mode="after")
    def _path_is_free(self) -> VolumeMount:
        problem = _mount_path_problem(self.mount_path)
        if problem:
            raise ValueError(f"mountPath '{self.mount_path}' {problem}")
        return self


class PodTemplateOverrides(WireModel):
    """What the job adds to every pod it runs (trainer master and workers, evaluate, the tune
    pod, Ray head, workers and submitter), for shared clusters: placement, priority, scheduler,
    volumes and env. The operator's own settings stay as they are and cannot be overridden: the
    security contexts (non-root, read-only root filesystem, no privilege escalation), its
    `ulmfit.io/*` and `app.kubernetes.io/managed-by` labels, its volumes, mounts and env, and
    `automountServiceAccountToken: false` (a pod never gets a Kubernetes API token, whatever
    `serviceAccountName` says). Applies from the next attempt of a stage on."""

    labels: Annotated[
        dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
        Field(max_length=MAX_ITEMS),
    ] = Field(default_factory=dict)
    """Extra pod labels. Keys under `ulmfit.io/`, `app.kubernetes.io/managed-by` and
    `kueue.x-k8s.io/queue-name` are the operator's (the queue is `spec.queueName`)."""
    annotations: Annotated[
        dict[str, Annotated[str, Field(max_length=4096)]], Field(max_length=MAX_ITEMS)
    ] = Field(default_factory=dict)
    """Extra pod annotations (e.g. for a service mesh or a log collector)."""
    tolerations: Annotated[list[Toleration], Field(max_length=MAX_ITEMS)] = Field(
        default_factory=list
    )
    """Taints the pods tolerate (a dedicated GPU pool, say)."""
    affinity: Affinity | None = None
    """Node affinity and pod (anti-)affinity."""
    priority_class_name: (
        Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)] | None
    ) = None
    """The pods' PriorityClass. Default: the cluster's default priority."""
    scheduler_name: (
        Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)] | None
    ) = None
    """The scheduler that places the pods, e.g. `volcano` or `scheduler-plugins-scheduler` for
    gang scheduling (with `runPolicy.schedulingPolicy`). Default: the cluster's."""
    service_account_name: (
        Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)] | None
    ) = None
    """The pods' ServiceAccount (for its image pull secrets, or a cloud workload identity such
    as IRSA that a webhook adds). Its Kubernetes API token is still not mounted. Default: the
    namespace's `default`."""
    image_pull_secrets: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]],
        Field(max_length=MAX_ITEMS),
    ] = Field(default_factory=list)
    """Names of Secrets (type `kubernetes.io/dockerconfigjson`) for pulling the trainer image
    from a private registry."""
    volumes: Annotated[list[Volume], Field(max_length=MAX_ITEMS)] = Field(default_factory=list)
    """Extra volumes: PersistentVolumeClaims, ConfigMaps, Secrets, emptyDirs. Names are unique and
    not the operator's (`stage-config`, `tmp`, `dshm`)."""
    volume_mounts: Annotated[list[VolumeMount], Field(max_length=MAX_ITEMS)] = Field(
        default_factory=list
    )
    """Where the extra volumes appear in every container; each names a volume of `volumes`,
    each path once."""
    env: Annotated[list[EnvVar], Field(max_length=MAX_ITEMS)] = Field(default_factory=list)
    """Extra environment variables of every container, each name once (proxies, a CA bundle,
    library settings). The operator's own variables are refused."""
    env_from: Annotated[list[EnvFromSource], Field(max_length=MAX_ITEMS)] = Field(
        default_factory=list
    )
    """Secrets and ConfigMaps whose keys become environment variables of every container."""

    @model_validator(mode="after")
    def _consistent(self) -> PodTemplateOverrides:
        for key in self.labels:
            problem = _label_key_problem(key)
            if problem:
                raise ValueError(f"labels: key '{key}' {problem}")
        for field, keys in (("labels", self.labels), ("annotations", self.annotations)):
            for key in keys:
                if len(key) > 317 or not re.fullmatch(LABEL_KEY, key):
                    raise ValueError(
                        f"{field}: key '{key}' is not a valid key: an optional DNS-subdomain "
                        "prefix and '/', then at most 63 alphanumerics, '-', '_' or '.'"
                    )
        _unique("volumes", [volume.name for volume in self.volumes], "name")
        _unique("volumeMounts", [mount.mount_path for mount in self.volume_mounts], "mountPath")
        _unique("env", [variable.name for variable in self.env], "name")
        declared = {volume.name for volume in self.volumes}
        for mount in self.volume_mounts:
            if mount.name not in declared:
                raise ValueError(
                    f"volumeMounts: '{mount.name}' (at {mount.mount_path}) is not a volume of "
                    "podTemplate.volumes"
                )
        return self


def _unique(field: str, values: list[str], key: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{field}: {key} '{value}' appears more than once")
        seen.add(value)
