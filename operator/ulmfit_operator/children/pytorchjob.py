"""Pure: the Kubeflow v1 PyTorchJob, the child of a distributed stage (the LM stages, each
co-trained model, the classifier): one Master and `workers - 1` Workers running torchrun.

Built by `pytorch_job`, read back by `observe` (its conditions), stopped through
`runPolicy.suspend` (`suspend_spec`), where batch Jobs and RayJobs take `spec.suspend`.
"""

from __future__ import annotations

from ulmfit_operator.api import ULMFiTJobSpec
from ulmfit_operator.children.common import (
    Attempt,
    Body,
    Child,
    ChildPhase,
    _failure_message,
    _port,
    _present,
    _true_conditions,
    read_child,
    torchrun_command,
)

PYTORCHJOB_API_VERSION = "kubeflow.org/v1"
PYTORCHJOB_KIND = "PyTorchJob"
PYTORCHJOB_PLURAL = "pytorchjobs"
PYTORCHJOB_CRD = f"{PYTORCHJOB_PLURAL}.kubeflow.org"

# The Training Operator looks the container and its port up by these names.
PYTORCH_CONTAINER = "pytorch"
PYTORCH_PORT_NAME = "pytorchjob-port"
PYTORCH_PORT = 23456


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


def observe(body: Body) -> Child | None:
    """A PyTorchJob we created, as reconcile sees it; None without our labels."""
    return read_child(body, _phase)


def _phase(spec: Body, status: Body) -> tuple[ChildPhase, str]:
    true = _true_conditions(status)
    if "Succeeded" in true:
        return ChildPhase.SUCCEEDED, ""
    if "Failed" in true:
        return ChildPhase.FAILED, _failure_message(true["Failed"])
    if "Suspended" in true or (spec.get("runPolicy") or {}).get("suspend"):
        return ChildPhase.SUSPENDED, ""
    if "Running" in true:
        return ChildPhase.RUNNING, ""
    return ChildPhase.PENDING, ""


def suspend_spec() -> Body:
    """The spec part of the merge patch that suspends a PyTorchJob."""
    return {"runPolicy": {"suspend": True}}
