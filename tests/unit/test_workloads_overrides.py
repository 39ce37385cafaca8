"""`podTemplate`, gang scheduling, Kueue queues and termination messages on every child.

The bodies with overrides also round-trip through the kubernetes client's typed models (an
oracle for field names, nesting and key order): a key the models do not know would be dropped.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client as k8s
from ulmfit_operator.api import (
    KUEUE_QUEUE_LABEL,
    Metadata,
    ULMFiTJob,
    parse_spec,
)
from ulmfit_operator.children import Attempt, Owner, child_workload
from ulmfit_operator.children.batch import evaluate_job, tune_job
from ulmfit_operator.children.pytorchjob import pytorch_job
from ulmfit_operator.children.rayjob import submitter_template, tune_rayjob
from ulmfit_operator.plan import make_plan
from ulmfit_operator.pod_overrides import OPERATOR_VOLUMES
from ulmfit_trainer.config import TuneBackend

from tests.unit.test_api_overrides import FULL

pytestmark = pytest.mark.timeout(60)

STORAGE = {
    "s3": {"endpoint": "http://minio:9000", "bucket": "ulmfit"},
    "credentialsSecretRef": "s3-keys",
}
SPACE = {"space": {"learningRate": {"type": "uniform", "low": 0.001, "high": 0.01}}}
OWNER = Owner("topics", "team", "uid-1")


def children(spec_doc: dict[str, Any], owner: Owner = OWNER) -> list[dict[str, Any]]:
    """Every child workload of the spec: PyTorchJobs, evaluate Job, tune Job and RayJob."""
    spec = parse_spec({"storage": STORAGE, "stages": {"tune": SPACE}, **spec_doc})
    job = ULMFiTJob(metadata=Metadata(name=owner.name, namespace="team"), spec=spec)
    assert spec.storage.s3 is not None
    plan = make_plan(job, spec.storage.s3.root, spec.storage.s3)
    bodies = []
    for stage in plan.stages:
        attempt = Attempt(owner, stage, spec, 1)
        bodies.append(child_workload(attempt))
        if stage.name == "tune":
            bodies.append(child_workload(attempt, TuneBackend.RAYJOB))
    assert {body["kind"] for body in bodies} == {"PyTorchJob", "Job", "RayJob"}
    return bodies


def pod_templates(body: dict[str, Any]) -> list[dict[str, Any]]:
    spec = body["spec"]
    if body["kind"] == "PyTorchJob":
        return [replica["template"] for replica in spec["pytorchReplicaSpecs"].values()]
    if body["kind"] == "Job":
        return [spec["template"]]
    cluster = spec["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [group["template"] for group in groups] + [spec["submitterPodTemplate"]]


def test_every_pod_gets_the_overrides_and_keeps_the_operators_settings() -> None:
    pods = [
        pod
        for body in children({"resources": {"workers": 2, "podTemplate": FULL}})
        for pod in pod_templates(body)
    ]
    assert len(pods) >= 6  # master, worker (x3 stages), evaluate, tune, head, worker, submitter
    for pod in pods:
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["labels"]["team"] == "nlp" and meta["labels"]["ulmfit.io/job"] == "topics"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "ulmfit-operator"
        assert meta["annotations"] == FULL["annotations"]
        assert spec["tolerations"][0] == {
            "effect": "NoSchedule",
            "key": "nvidia.com/gpu",
            "operator": "Exists",
        }
        assert spec["tolerations"][1]["tolerationSeconds"] == 60
        required = spec["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert required["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["a100"]
        assert spec["priorityClassName"] == "batch-low"
        assert spec["schedulerName"] == "volcano"
        assert spec["serviceAccountName"] == "trainer"
        assert spec["imagePullSecrets"] == [{"name": "registry-creds"}]
        # Still no API token, still non-root, whatever the ServiceAccount.
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        names = [volume["name"] for volume in spec["volumes"]]
        assert names[-4:] == ["data", "certs", "cache", "settings"]
        assert {"claimName": "corpus", "readOnly": True} in [
            v.get("persistentVolumeClaim") for v in spec["volumes"]
        ]
        assert not any("hostPath" in volume for volume in spec["volumes"])
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/data"] == {"mountPath": "/data", "name": "data", "readOnly": True}
            assert mounts["/tmp/.cache/huggingface"]["subPath"] == "hf"
            env = [variable["name"] for variable in container["env"]]
            assert env[:3] == ["HTTPS_PROXY", "TOKEN", "NODE"]
            assert "HOME" in env and len(env) == len(set(env))
            assert container["env"][1]["valueFrom"] == {"secretKeyRef": {"key": "t", "name": "tok"}}
            assert container["envFrom"] == [
                {"configMapRef": {"name": "settings"}, "prefix": "APP_"}
            ]
            for mount in container["volumeMounts"]:
                assert mount["name"] in names


def test_without_overrides_pods_are_as_before() -> None:
    for body in children({}):
        for pod in pod_templates(body):
            spec = pod["spec"]
            for key in (
                "affinity",
                "tolerations",
                "schedulerName",
                "serviceAccountName",
                "imagePullSecrets",
                "priorityClassName",
            ):
                assert key not in spec
            assert "annotations" not in pod["metadata"]
            assert {v["name"] for v in spec["volumes"]} <= set(OPERATOR_VOLUMES)
            for container in spec["containers"]:
                assert "envFrom" not in container
                assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def _round_trip(body: dict[str, Any], klass: str) -> Any:
    api = k8s.ApiClient()
    model = api._ApiClient__deserialize(body, klass)  # type: ignore[attr-defined]
    return api.sanitize_for_serialization(model)


def test_pod_templates_with_overrides_are_what_the_kubernetes_models_make() -> None:
    for body in children({"resources": {"workers": 2, "podTemplate": FULL}}):
        for pod in pod_templates(body):
            assert json.dumps(_round_trip(pod, "V1PodTemplateSpec")) == json.dumps(pod)


def test_gang_scheduling_policy_defaults_to_every_pod_of_the_stage() -> None:
    spec = {"resources": {"workers": 3}, "runPolicy": {"schedulingPolicy": {"queue": "research"}}}
    jobs = [body for body in children(spec) if body["kind"] == "PyTorchJob"]
    assert jobs
    for body in jobs:
        assert body["spec"]["runPolicy"]["schedulingPolicy"] == {
            "minAvailable": 3,
            "queue": "research",
        }
    full = {
        "minAvailable": 2,
        "priorityClass": "high",
        "queue": "q",
        "scheduleTimeoutSeconds": 300,
    }
    spec = {"resources": {"workers": 3}, "runPolicy": {"schedulingPolicy": full}}
    body = next(b for b in children(spec) if b["kind"] == "PyTorchJob")
    assert body["spec"]["runPolicy"] == {
        "backoffLimit": 0,
        "cleanPodPolicy": "Running",
        "schedulingPolicy": full,
    }
    # Without a policy there is none.
    body = next(b for b in children({}) if b["kind"] == "PyTorchJob")
    assert body["spec"]["runPolicy"] == {"backoffLimit": 0, "cleanPodPolicy": "Running"}


def test_gang_policy_matches_the_kubeflow_model() -> None:
    from kubeflow.training.models import KubeflowOrgV1SchedulingPolicy

    names = set(KubeflowOrgV1SchedulingPolicy.attribute_map.values())
    spec = {"runPolicy": {"schedulingPolicy": {"priorityClass": "p", "scheduleTimeoutSeconds": 5}}}
    body = next(b for b in children(spec) if b["kind"] == "PyTorchJob")
    assert set(body["spec"]["runPolicy"]["schedulingPolicy"]) <= names


@pytest.mark.parametrize(
    ("spec_doc", "owner"),
    [
        ({"queueName": "team-a"}, OWNER),
        ({}, Owner("topics", "team", "uid-1", queue_label="team-a")),
        ({"queueName": "team-a"}, Owner("topics", "team", "uid-1", queue_label="other")),
    ],
    ids=["spec", "label", "spec-wins"],
)
def test_queued_children_are_created_suspended_with_the_queue_label(
    spec_doc: dict[str, Any], owner: Owner
) -> None:
    for body in children(spec_doc, owner):
        assert body["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
        if body["kind"] == "PyTorchJob":
            assert body["spec"]["runPolicy"]["suspend"] is True
        else:
            assert body["spec"]["suspend"] is True
        if body["kind"] == "RayJob":
            assert body["spec"]["shutdownAfterJobFinishes"] is True
        for pod in pod_templates(body):
            assert KUEUE_QUEUE_LABEL not in pod["metadata"]["labels"]


def test_unqueued_children_start_at_once() -> None:
    for body in children({}):
        assert KUEUE_QUEUE_LABEL not in body["metadata"]["labels"]
        assert "suspend" not in body["spec"]
        assert "suspend" not in body["spec"].get("runPolicy", {})


def test_owner_from_metadata_reads_the_queue_label() -> None:
    meta = {"name": "j", "namespace": "n", "uid": "u", "labels": {KUEUE_QUEUE_LABEL: "q"}}
    assert Owner.from_metadata(meta) == Owner("j", "n", "u", queue_label="q")
    assert Owner.from_metadata({"name": "j"}) == Owner("j", "default", "")


def test_builders_each_apply_the_overrides() -> None:
    """The named builders (not only child_workload) carry the overrides."""
    spec = parse_spec(
        {"storage": STORAGE, "stages": {"tune": SPACE}, "resources": {"podTemplate": FULL}}
    )
    job = ULMFiTJob(metadata=Metadata(name="topics", namespace="team"), spec=spec)
    assert spec.storage.s3 is not None
    plan = make_plan(job, spec.storage.s3.root, spec.storage.s3)
    bodies = [
        pytorch_job(Attempt(OWNER, plan.stage("classifier"), spec, 1)),
        evaluate_job(Attempt(OWNER, plan.stage("evaluate"), spec, 1)),
        tune_job(Attempt(OWNER, plan.stage("tune"), spec, 1)),
        tune_rayjob(Attempt(OWNER, plan.stage("tune"), spec, 1)),
        {
            "kind": "Job",
            "spec": {"template": submitter_template(Attempt(OWNER, plan.stage("tune"), spec, 1))},
        },
    ]
    for body in bodies:
        for pod in pod_templates(body):
            assert pod["spec"]["schedulerName"] == "volcano"


# ------------------------------------------------------------- the trainer's termination message


def test_trainer_writes_its_first_error_line_to_the_termination_log(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ulmfit_trainer import __main__ as trainer

    log = tmp_path / "termination-log"
    log.write_text("")  # the kubelet creates it empty
    monkeypatch.setenv(trainer.TERMINATION_LOG_ENV, str(log))
    missing = tmp_path / "nope.json"
    assert trainer.main(["evaluate", "--config", str(missing)]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith(f"error: cannot read stage config {missing}")
    assert log.read_text() == printed.splitlines()[0] + "\n"
    # A second failure (another rank in the same container) keeps the first.
    assert trainer.write_termination_message("later: echo") is False
    assert log.read_text() == printed.splitlines()[0] + "\n"


def test_termination_log_is_best_effort(tmp_path: Any) -> None:
    from ulmfit_trainer.__main__ import write_termination_message

    absent = tmp_path / "absent"
    assert write_termination_message("boom", str(absent)) is False
    assert not absent.exists()  # never created outside a pod
    assert write_termination_message("boom", str(tmp_path)) is False  # a directory: no raise
    target = tmp_path / "log"
    target.write_text("")
    assert write_termination_message("first line\nsecond", str(target)) is True
    assert target.read_text() == "first line\n"
