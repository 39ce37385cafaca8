"""The TrainJob backend, as pure logic: the TrainJob a stage becomes, how it reads back, which
backend a job gets, and what a TrainJob refuses. What Kubeflow Trainer v2 and JobSet make of it
is tested on the one-node cluster (tests/e2e/test_cluster_trainjob.py)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
from ulmfit_operator.api import TrainingBackend
from ulmfit_operator.children import (
    Attempt,
    ChildPhase,
    Cluster,
    child_workload,
    observe_child,
    stop_patch,
    training_backend,
    training_runtime,
)
from ulmfit_operator.children.trainjob import PATCH_MANAGER, unsupported
from ulmfit_operator.reconcile import CreateObject

from tests.unit.test_reconcile import CREATED, Store, child, condition, job
from tests.unit.test_workloads import OWNER, SPEC, planned

pytestmark = pytest.mark.timeout(60)

TRAINJOB = Cluster(trainjob=True, pytorchjob=True)


def trainjob_of(spec: dict[str, Any] = SPEC, stage: str = "classifier") -> dict[str, Any]:
    parsed, plan = planned(spec)
    attempt = Attempt(OWNER, plan.stage(stage), parsed, 2, training_runtime="ulmfit-torch")
    return child_workload(attempt, training=TrainingBackend.TRAINJOB)


def pytorch_pod(spec: dict[str, Any] = SPEC, stage: str = "classifier") -> dict[str, Any]:
    parsed, plan = planned(spec)
    body = child_workload(Attempt(OWNER, plan.stage(stage), parsed, 2))
    return body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]


def merged_pod(trainjob: dict[str, Any]) -> dict[str, Any]:
    """The pod that runtime + TrainJob describe together, merged the way Trainer v2 documents:
    the runtime's template, the patch's metadata and pod fields over it, the patch's container
    fields over the `node` container, and the trainer's image, command, env and resources."""
    runtime = training_runtime(trainjob["spec"]["runtimeRef"]["name"])
    [replicated] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = copy.deepcopy(replicated["template"]["spec"]["template"])
    [patch] = trainjob["spec"]["runtimePatches"]
    [patched] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert patched["name"] == replicated["name"] == "node"
    pod_patch = patched["template"]["spec"]["template"]
    pod["metadata"] = pod_patch["metadata"]
    [container] = pod["spec"]["containers"]
    for key, value in pod_patch["spec"].items():
        if key == "containers":
            [container_patch] = value
            container.update({k: v for k, v in container_patch.items() if k != "name"})
        else:
            pod["spec"][key] = value
    trainer = trainjob["spec"]["trainer"]
    container.update(
        command=trainer["command"],
        env=trainer["env"],
        image=trainer["image"],
        resources=trainer["resourcesPerNode"],
    )
    return pod


def test_operator_trainjob_maps_workers_processes_and_resources() -> None:
    body = trainjob_of()
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["name"] == "topics-classifier-a2"
    assert body["metadata"]["labels"]["ulmfit.io/attempt"] == "2"
    spec = body["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "ulmfit-torch",
    }
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 2
    assert trainer["resourcesPerNode"]["limits"] == {
        "cpu": "2",
        "memory": "8Gi",
        "nvidia.com/gpu": "2",
    }
    assert trainer["image"] == "registry.example/trainer:1"
    # torchrun takes its rendezvous from Trainer's PET_* variables: no flag names one.
    assert trainer["command"][0] == "torchrun"
    assert not any("master" in arg or "node-rank" in arg for arg in trainer["command"])
    assert trainer["command"][-3:] == ["classifier", "--config", "/etc/ulmfit/stage.json"]
    names = [variable["name"] for variable in trainer["env"]]
    assert "ULMFIT_ATTEMPT" in names and "MY_KEY" in names
    # Trainer's torch policy sets these itself (and the API refuses them in podTemplate.env).
    assert not {n for n in names if n.startswith("PET_")}
    assert "suspend" not in spec  # not queued: it starts at once
    [patch] = spec["runtimePatches"]
    assert patch["manager"] == PATCH_MANAGER


def test_operator_trainjob_pod_is_the_pytorchjob_pod() -> None:
    """Runtime + patch + trainer make exactly the pod the PyTorchJob path makes, with every
    podTemplate override the TrainJob accepts; only the container's name, command and port (the
    torch runtime adds its own) differ."""
    overrides = {
        "labels": {"team": "nlp"},
        "annotations": {"note": "x"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "serviceAccountName": "trainer",
        "imagePullSecrets": ["regcred"],
        "volumes": [{"name": "corpus", "persistentVolumeClaim": {"claimName": "corpus"}}],
        "volumeMounts": [{"name": "corpus", "mountPath": "/corpus", "readOnly": True}],
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
    }
    spec = {**SPEC, "resources": {**SPEC["resources"], "podTemplate": overrides}}
    merged = merged_pod(trainjob_of(spec))
    expected = pytorch_pod(spec)
    for pod in (merged, expected):
        [container] = pod["spec"]["containers"]
        for key in ("name", "command", "ports"):
            container.pop(key, None)
    assert merged == expected


def test_operator_trainjob_is_queued_suspended_with_kueues_label() -> None:
    spec = {**SPEC, "queueName": "team-queue"}
    body = trainjob_of(spec)
    assert body["spec"]["suspend"] is True
    assert body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-queue"


def test_operator_only_distributed_stages_become_trainjobs() -> None:
    parsed, plan = planned()
    kinds = {
        stage.name: child_workload(
            Attempt(OWNER, stage, parsed, 1), training=TrainingBackend.TRAINJOB
        )["kind"]
        for stage in plan.stages
    }
    assert kinds == {"finetune": "TrainJob", "classifier": "TrainJob", "evaluate": "Job"}


def status_of(**status: Any) -> dict[str, Any]:
    body = trainjob_of()
    body["metadata"].update(namespace="team", creationTimestamp="2026-03-01T12:00:00Z")
    body["metadata"]["ownerReferences"] = [OWNER.owner_reference()]
    if "suspend" in status:
        body["spec"]["suspend"] = status.pop("suspend")
    body["status"] = status
    return body


def true(kind: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


@pytest.mark.parametrize(
    ("status", "phase", "message"),
    [
        ({}, ChildPhase.PENDING, ""),
        # A pod still pulling its image keeps its Job active, not ready: not started yet.
        ({"jobsStatus": [{"name": "node", "active": 1, "ready": 0}]}, ChildPhase.PENDING, ""),
        ({"jobsStatus": [{"name": "node", "active": 1, "ready": 1}]}, ChildPhase.RUNNING, ""),
        ({"conditions": [true("Complete", "JobSetCompleted")]}, ChildPhase.SUCCEEDED, ""),
        (
            {"conditions": [true("Failed", "JobSetFailed", "node-0 failed: BackoffLimit")]},
            ChildPhase.FAILED,
            "JobSetFailed: node-0 failed: BackoffLimit",
        ),
        ({"conditions": [true("Suspended", "Suspended")]}, ChildPhase.SUSPENDED, ""),
        ({"suspend": True}, ChildPhase.SUSPENDED, ""),
    ],
)
def test_operator_reads_trainjob_status(
    status: dict[str, Any], phase: ChildPhase, message: str
) -> None:
    observed = observe_child(status_of(**status))
    assert observed is not None
    assert (observed.kind, observed.phase, observed.message) == ("TrainJob", phase, message)
    assert observed.owner_uid == OWNER.uid and observed.attempt == 2


def test_operator_trainjob_resumed_by_its_queue_is_timed_from_then() -> None:
    resumed = {"type": "Suspended", "status": "False", "reason": "Resumed",
               "lastTransitionTime": "2026-03-01T12:03:00Z"}  # fmt: skip
    observed = observe_child(status_of(conditions=[resumed]))
    assert observed is not None and observed.resumed is not None
    assert observed.resumed.minute == 3


def test_operator_stops_a_trainjob_by_suspending_it() -> None:
    patch = stop_patch("TrainJob", "ProgressDeadlineExceeded")
    assert patch["spec"] == {"suspend": True}
    assert patch["metadata"]["annotations"]["ulmfit.io/stopped"] == "ProgressDeadlineExceeded"


# --------------------------------------------------------------------------- choosing a backend


@pytest.mark.parametrize(
    ("wanted", "cluster", "started_on", "backend", "refused"),
    [
        (None, Cluster(trainjob=True), None, TrainingBackend.TRAINJOB, None),
        (None, Cluster(trainjob=False), None, TrainingBackend.PYTORCHJOB, None),
        # A job keeps the kind its stages started on, while it is served.
        (None, Cluster(trainjob=True), "PyTorchJob", TrainingBackend.PYTORCHJOB, None),
        (None, Cluster(trainjob=True, pytorchjob=False), "PyTorchJob", TrainingBackend.TRAINJOB,
         None),
        (TrainingBackend.PYTORCHJOB, Cluster(trainjob=True), "TrainJob",
         TrainingBackend.PYTORCHJOB, None),
        (TrainingBackend.TRAINJOB, Cluster(trainjob=False), None, TrainingBackend.TRAINJOB,
         "spec.resources.trainingBackend"),
        (TrainingBackend.PYTORCHJOB, Cluster(trainjob=True, pytorchjob=False), None,
         TrainingBackend.PYTORCHJOB, "spec.resources.trainingBackend"),
        (None, Cluster(pytorchjob=False, training_backend=TrainingBackend.TRAINJOB), None,
         TrainingBackend.TRAINJOB, "--training-backend"),
        (None, Cluster(pytorchjob=False), None, TrainingBackend.PYTORCHJOB, "--training-backend"),
    ],
)  # fmt: skip
def test_operator_picks_the_training_backend(
    wanted: TrainingBackend | None,
    cluster: Cluster,
    started_on: str | None,
    backend: TrainingBackend,
    refused: str | None,
) -> None:
    chosen, problem = training_backend(wanted, cluster, started_on)
    assert chosen == backend
    if refused is None:
        assert problem is None
    else:
        assert problem is not None and problem[0] == refused


def test_operator_runs_distributed_stages_as_trainjobs_where_served() -> None:
    decision = Store().decide(job(), cluster=TRAINJOB)
    kinds = [(a.kind, a.name) for a in decision.actions if isinstance(a, CreateObject)]
    assert kinds == [("ConfigMap", "topics-finetune-a1-config"), ("TrainJob", "topics-finetune-a1")]
    [event] = decision.events
    assert "created TrainJob topics-finetune-a1" in event.message


def test_operator_keeps_a_running_job_on_its_pytorchjobs() -> None:
    """Trainer v2 installed while a job ran on PyTorchJobs (seen after a restart): the job's
    next attempt is a PyTorchJob again, not a mix."""
    failed = replace(child("finetune", 1, ChildPhase.FAILED), created=CREATED)
    decision = Store().decide(job(), [failed], cluster=TRAINJOB)
    kinds = [a.kind for a in decision.actions if isinstance(a, CreateObject)]
    assert kinds == ["ConfigMap", "PyTorchJob"]


def refusal(decision: Any) -> str:
    assert not [a for a in decision.actions if isinstance(a, CreateObject)]
    failed = condition(decision.status or {}, "Failed")
    assert failed is not None and failed["reason"] == "InvalidSpec"
    return str(failed["message"])


def test_operator_refuses_a_backend_the_cluster_does_not_serve() -> None:
    body = job({"resources": {"trainingBackend": "trainjob"}})
    message = refusal(Store().decide(body, cluster=Cluster(trainjob=False)))
    assert "spec.resources.trainingBackend" in message
    assert "trainjobs.trainer.kubeflow.org" in message
    message = refusal(
        Store().decide(
            job({"resources": {"trainingBackend": "pytorchjob"}}),
            cluster=Cluster(trainjob=True, pytorchjob=False),
        )
    )
    assert "pytorchjobs.kubeflow.org" in message


@pytest.mark.parametrize(
    ("resources", "run_policy", "field"),
    [
        ({"imagePullPolicy": "Never"}, {}, "spec.resources.imagePullPolicy"),
        ({"podTemplate": {"priorityClassName": "high"}}, {},
         "spec.resources.podTemplate.priorityClassName"),
        ({"podTemplate": {"schedulerName": "volcano"}}, {},
         "spec.resources.podTemplate.schedulerName"),
        ({"podTemplate": {"envFrom": [{"configMapRef": {"name": "settings"}}]}}, {},
         "spec.resources.podTemplate.envFrom"),
        ({}, {"schedulingPolicy": {"queue": "gpu"}}, "spec.runPolicy.schedulingPolicy"),
    ],
)  # fmt: skip
def test_operator_refuses_what_a_trainjob_cannot_express(
    resources: dict[str, Any], run_policy: dict[str, Any], field: str
) -> None:
    body = job({"resources": {**resources, "trainingBackend": "trainjob"}, "runPolicy": run_policy})
    message = refusal(Store().decide(body, cluster=TRAINJOB))
    assert field in message
    # The same spec runs on PyTorchJob, which can express it.
    body["spec"]["resources"]["trainingBackend"] = "pytorchjob"
    decision = Store().decide(body, cluster=TRAINJOB)
    assert [a.kind for a in decision.actions if isinstance(a, CreateObject)][-1] == "PyTorchJob"


def test_operator_trainjob_accepts_the_default_spec() -> None:
    parsed, _ = planned({"storage": SPEC["storage"]})
    assert unsupported(parsed) == []


def test_operator_runtime_is_hardened_like_the_pytorchjob_pods() -> None:
    runtime = training_runtime("ulmfit-torch")
    assert runtime["kind"] == "ClusterTrainingRuntime"
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
    template = runtime["spec"]["template"]["spec"]
    assert template["failurePolicy"] == {"maxRestarts": 0}
    [node] = template["replicatedJobs"]
    assert node["template"]["spec"]["backoffLimit"] == 0
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_operator_committed_runtime_is_the_generated_one() -> None:
    """manifests/trainer/ (and the chart's copy of it) is what `ulmfit training-runtime` prints:
    the runtime the TrainJobs are built against."""
    from pathlib import Path

    from typer.testing import CliRunner
    from ulmfit_operator.cli import app

    root = Path(__file__).resolve().parents[2]
    committed = root / "manifests" / "trainer" / "cluster-training-runtime.yaml"
    printed = CliRunner().invoke(app, ["training-runtime"])
    assert printed.exit_code == 0, printed.output
    assert committed.read_text() == printed.output, "regenerate it: make generate"
