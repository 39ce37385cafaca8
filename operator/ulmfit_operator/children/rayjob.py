"""Pure: the KubeRay RayJob, the child of the tune stage with backend `rayjob`: a Ray cluster (a
head plus `workers - 1` workers) that KubeRay starts, submits the sweep to, and deletes when it
ends.

Built by `tune_rayjob` (with our own `submitter_template`), read back by `observe` (KubeRay's
`jobStatus` and `jobDeploymentStatus`), stopped through `spec.suspend`.
"""

from __future__ import annotations

import math

from ulmfit_operator.children.common import (
    ROLE_RAY_HEAD,
    TERMINATION_MESSAGE_POLICY,
    TMP_VOLUME,
    Attempt,
    Body,
    Child,
    ChildPhase,
    _dashboard_port,
    _empty_dir,
    _env,
    _port,
    _present,
    _security_context,
    read_child,
    single_process_command,
)

RAYJOB_API_VERSION = "ray.io/v1"
RAYJOB_KIND = "RayJob"
RAYJOB_PLURAL = "rayjobs"
RAYJOB_CRD = f"{RAYJOB_PLURAL}.ray.io"
ROLE_RAY_SUBMITTER = "ray-submitter"
"""On a RayJob's submitter pod (KubeRay runs `ray job submit` there)."""
RAY_HEAD_CONTAINER = "ray-head"
RAY_WORKER_CONTAINER = "ray-worker"
RAY_GCS_PORT = 6379
RAY_CLIENT_PORT = 10001


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


def observe(body: Body) -> Child | None:
    """A RayJob we created, as reconcile sees it; None without our labels."""
    return read_child(body, _phase)


def _phase(spec: Body, status: Body) -> tuple[ChildPhase, str]:
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
