"""Pure: the Kubeflow Trainer v2 TrainJob, the child of a distributed stage on the `trainjob`
backend: `numNodes` pods of the operator's ClusterTrainingRuntime (Trainer's torch policy, run
as a JobSet), each running torchrun.

A TrainJob says less about its pods than a PyTorchJob: the runtime holds the pod template, and
the TrainJob adds the trainer's image, command, env and resources, plus `runtimePatches` (pod
labels and annotations, volumes, the container's mounts and security context, the pod's security
context, ServiceAccount, pull secrets, node selector, affinity, tolerations). So `train_job`
builds the same pod as the PyTorchJob path (`Attempt.pod_template`) and then carries every part
of it over: into `trainer`, into the patch, or to what the runtime already sets
(`training_runtime`, shipped by the chart). A part none of them can take is an error, never a
silent drop; `unsupported` names the fields of a spec that would need one, so reconcile refuses
such a job (InvalidSpec) before it creates anything.

Trainer's torch policy gives each pod `PET_NNODES`, `PET_NPROC_PER_NODE`, `PET_NODE_RANK` (the
pod's completion index) and `PET_MASTER_ADDR`/`PET_MASTER_PORT` (`<trainjob>-node-0-0.<trainjob>`,
port 29500), which torchrun reads by itself: the command names none of them.

Built by `train_job`, read back by `observe` (conditions `Complete`, `Failed`, `Suspended`, and
`jobsStatus` for whether pods run), suspended through `spec.suspend` as a Job is
(`common.suspend_spec`).
"""

from __future__ import annotations

from typing import Any

from ulmfit_operator.api import DEFAULT_TRAINER_IMAGE, ULMFiTJobSpec
from ulmfit_operator.children.common import (
    CONFIG_PATH,
    DEFAULT_TRAINING_RUNTIME,
    MANAGER,
    TERMINATION_MESSAGE_POLICY,
    Attempt,
    Body,
    Child,
    ChildPhase,
    _failure_message,
    _pod_security_context,
    _present,
    _security_context,
    _true_conditions,
    read_child,
)

TRAINER_GROUP = "trainer.kubeflow.org"
TRAINJOB_API_VERSION = f"{TRAINER_GROUP}/v1alpha1"
TRAINJOB_KIND = "TrainJob"
TRAINJOB_PLURAL = "trainjobs"
TRAINJOB_CRD = f"{TRAINJOB_PLURAL}.{TRAINER_GROUP}"
CLUSTER_TRAINING_RUNTIME_KIND = "ClusterTrainingRuntime"

RUNTIME_PULL_POLICY = "IfNotPresent"
"""The runtime's image pull policy: a TrainJob cannot set its own."""
PATCH_MANAGER = f"ulmfit.io/{MANAGER}"
"""Whose entry of `runtimePatches` ours is (Kueue writes its own beside it)."""

# Names Trainer v2 gives the pods' parts: the replicated job the torch policy scales, its one
# container, and the label that marks the trainer step in a runtime.
NODE = "node"
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
ANCESTOR_TRAINER = "trainer"

# Where each part of the pod that `Attempt.pod_template` builds goes on a TrainJob.
_POD_SPEC_PATCHED = (
    "affinity",
    "imagePullSecrets",
    "nodeSelector",
    "securityContext",
    "serviceAccountName",
    "tolerations",
    "volumes",
)
_POD_SPEC_IN_RUNTIME = {
    "automountServiceAccountToken": False,
    "enableServiceLinks": False,
    "restartPolicy": "Never",
}
_CONTAINER_IN_TRAINER = ("command", "env", "image", "resources")
_CONTAINER_PATCHED = ("securityContext", "volumeMounts")
_CONTAINER_IN_RUNTIME = {
    "imagePullPolicy": RUNTIME_PULL_POLICY,
    "name": NODE,
    "terminationMessagePolicy": TERMINATION_MESSAGE_POLICY,
}


class Unexpressible(ValueError):
    """A part of the pod that a TrainJob cannot carry (a bug: `unsupported` should refuse the
    spec first)."""


def unsupported(spec: ULMFiTJobSpec) -> list[tuple[str, Any, str]]:
    """The fields of `spec` a TrainJob cannot express, as InvalidSpec problems (field, value,
    why); empty when it runs as one."""
    problems: list[tuple[str, Any, str]] = []
    res = spec.resources
    pod = res.pod_template
    where = "a TrainJob takes its pod template from its ClusterTrainingRuntime"
    if res.image_pull_policy != RUNTIME_PULL_POLICY:
        problems.append(
            (
                "spec.resources.imagePullPolicy",
                res.image_pull_policy,
                f"{where}, whose pull policy is {RUNTIME_PULL_POLICY}; use {RUNTIME_PULL_POLICY} "
                "or trainingBackend pytorchjob",
            )
        )
    if pod is not None:
        if pod.priority_class_name:
            problems.append(
                (
                    "spec.resources.podTemplate.priorityClassName",
                    pod.priority_class_name,
                    f"{where}, and runtimePatches cannot set a priority class; use Kueue's "
                    "WorkloadPriorityClass or trainingBackend pytorchjob",
                )
            )
        if pod.scheduler_name:
            problems.append(
                (
                    "spec.resources.podTemplate.schedulerName",
                    pod.scheduler_name,
                    f"{where}, and runtimePatches cannot set the scheduler; set it in the "
                    "runtime or use trainingBackend pytorchjob",
                )
            )
        if pod.env_from:
            problems.append(
                (
                    "spec.resources.podTemplate.envFrom",
                    [
                        source.model_dump(by_alias=True, exclude_none=True)
                        for source in pod.env_from
                    ],
                    "a TrainJob's trainer takes single variables only (env), not envFrom; list "
                    "them in podTemplate.env or use trainingBackend pytorchjob",
                )
            )
    if spec.run_policy.scheduling_policy is not None:
        problems.append(
            (
                "spec.runPolicy.schedulingPolicy",
                spec.run_policy.scheduling_policy.model_dump(by_alias=True, exclude_none=True),
                "a TrainJob's gang scheduling is its runtime's podGroupPolicy, not a per-job "
                "setting; use trainingBackend pytorchjob for a per-job gang",
            )
        )
    return problems


def torchrun_command(stage: str) -> list[str]:
    """torchrun with the static rendezvous the torch policy's `PET_*` variables describe."""
    return [
        "torchrun",
        "--max-restarts=0",
        "-m",
        "ulmfit_trainer",
        stage,
        "--config",
        CONFIG_PATH,
    ]


def train_job(attempt: Attempt) -> Body:
    """The TrainJob for one attempt of a distributed stage: `workers` pods of the attempt's
    ClusterTrainingRuntime."""
    res = attempt.spec.resources
    command = torchrun_command(attempt.stage.kind.value)
    template = attempt.pod_template(attempt.container(NODE, command, res.gpus_per_worker))
    pod_spec: Body = template["spec"]
    [container] = pod_spec["containers"]
    _check_carried(pod_spec, container)
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "template": {
                                "spec": {
                                    "template": {
                                        "metadata": template["metadata"],
                                        "spec": _pod_patch(pod_spec, container),
                                    }
                                }
                            },
                        }
                    ]
                }
            }
        },
    }
    trainer = {
        "command": container["command"],
        "env": container["env"],
        "image": container["image"],
        "numNodes": res.workers,
        "numProcPerNode": res.processes_per_worker,
        "resourcesPerNode": container["resources"],
    }
    return {
        "apiVersion": TRAINJOB_API_VERSION,
        "kind": TRAINJOB_KIND,
        "metadata": attempt.metadata(),
        "spec": _present(
            {
                "runtimeRef": {
                    "apiGroup": TRAINER_GROUP,
                    "kind": CLUSTER_TRAINING_RUNTIME_KIND,
                    "name": attempt.training_runtime,
                },
                "runtimePatches": [patch],
                "suspend": True if attempt.queue else None,
                "trainer": trainer,
            }
        ),
    }


def _pod_patch(pod_spec: Body, container: Body) -> Body:
    patched = {key: pod_spec[key] for key in _POD_SPEC_PATCHED if key in pod_spec}
    patched["containers"] = [
        {"name": NODE, **{key: container[key] for key in _CONTAINER_PATCHED if key in container}}
    ]
    return dict(sorted(patched.items()))


def _check_carried(pod_spec: Body, container: Body) -> None:
    """Every part of the pod goes somewhere: the trainer, the patch, or the runtime (same
    value). Anything else would be dropped."""
    for body, patched, in_runtime, what in (
        (pod_spec, (*_POD_SPEC_PATCHED, "containers"), _POD_SPEC_IN_RUNTIME, "pod spec"),
        (
            container,
            (*_CONTAINER_IN_TRAINER, *_CONTAINER_PATCHED),
            _CONTAINER_IN_RUNTIME,
            "container",
        ),
    ):
        for key, value in body.items():
            if key in patched:
                continue
            if key not in in_runtime:
                raise Unexpressible(f"a TrainJob cannot carry the {what}'s {key}: {value!r}")
            if in_runtime[key] != value:
                raise Unexpressible(
                    f"the {what}'s {key} is {value!r}, the runtime's {in_runtime[key]!r}"
                )


def training_runtime(name: str = DEFAULT_TRAINING_RUNTIME) -> Body:
    """The ClusterTrainingRuntime our TrainJobs name: Trainer's torch policy over one replicated
    job `node`, its pods hardened as the PyTorchJob path's are. Retries are the operator's (a new
    attempt that resumes from the store), so neither the Job nor the JobSet restarts anything.
    The image is a placeholder: every TrainJob sets its own."""
    pod_spec = {
        **_POD_SPEC_IN_RUNTIME,
        "containers": [
            {
                "image": DEFAULT_TRAINER_IMAGE,
                **_CONTAINER_IN_RUNTIME,
                "securityContext": _security_context(),
            }
        ],
        "securityContext": _pod_security_context(),
    }
    return {
        "apiVersion": TRAINJOB_API_VERSION,
        "kind": CLUSTER_TRAINING_RUNTIME_KIND,
        "metadata": {
            "labels": {
                "app.kubernetes.io/managed-by": MANAGER,
                "trainer.kubeflow.org/framework": "torch",
            },
            "name": name,
        },
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {
                "spec": {
                    "failurePolicy": {"maxRestarts": 0},
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "template": {
                                "metadata": {"labels": {ANCESTOR_LABEL: ANCESTOR_TRAINER}},
                                "spec": {
                                    "backoffLimit": 0,
                                    "template": {"spec": dict(sorted(pod_spec.items()))},
                                },
                            },
                        }
                    ],
                }
            },
        },
    }


def observe(body: Body) -> Child | None:
    """A TrainJob we created, as reconcile sees it; None without our labels."""
    return read_child(body, _phase)


def _phase(spec: Body, status: Body) -> tuple[ChildPhase, str]:
    true = _true_conditions(status)
    if "Complete" in true:
        return ChildPhase.SUCCEEDED, ""
    if "Failed" in true:
        return ChildPhase.FAILED, _failure_message(true["Failed"])
    if "Suspended" in true or spec.get("suspend"):
        return ChildPhase.SUSPENDED, ""
    # `ready` counts the Jobs whose pods have all started (as the pending deadline means it);
    # `active` would count a pod still waiting for its image.
    jobs = status.get("jobsStatus") or []
    if any((job.get("ready") or 0) > 0 or (job.get("succeeded") or 0) > 0 for job in jobs):
        return ChildPhase.RUNNING, ""
    return ChildPhase.PENDING, ""
