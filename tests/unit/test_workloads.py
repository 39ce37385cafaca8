"""The child objects: what the Training Operator and the kubelet will get, and reading them back."""

from __future__ import annotations

import json
from typing import Any

import pytest
from ulmfit_operator.api import Metadata, ULMFiTJob, parse_spec
from ulmfit_operator.children import (
    Attempt,
    ChildPhase,
    Owner,
    child_workload,
    dashboard_service,
    dashboard_service_name,
    network_policy,
    observe_child,
    stage_config_map,
    stop_patch,
)
from ulmfit_operator.children.batch import evaluate_job, tune_gpus, tune_job
from ulmfit_operator.children.common import ANNOTATION_STOPPED, MAX_CHILD_NAME, child_name
from ulmfit_operator.children.pytorchjob import pytorch_job
from ulmfit_operator.children.rayjob import tune_rayjob
from ulmfit_operator.plan import make_plan
from ulmfit_operator.policy import PodNetwork
from ulmfit_trainer.config import StageConfig, TuneBackend

pytestmark = pytest.mark.timeout(60)

OWNER = Owner("topics", "team", "uid-1")
SPEC = {
    "storage": {
        "s3": {"endpoint": "http://minio:9000", "bucket": "ulmfit", "accessKeyEnv": "MY_KEY"},
        "credentialsSecretRef": "s3-keys",
    },
    "resources": {
        "workers": 3,
        "processesPerWorker": 2,
        "gpusPerWorker": 2,
        "image": "registry.example/trainer:1",
        "nodeSelector": {"pool": "gpu"},
    },
}


def planned(spec: dict[str, Any] = SPEC) -> tuple[Any, Any]:
    parsed = parse_spec(spec)
    job = ULMFiTJob(metadata=Metadata(name="topics", namespace="team"), spec=parsed)
    assert parsed.storage.s3 is not None
    return parsed, make_plan(job, parsed.storage.s3.root, parsed.storage.s3)


def container(pod_template: dict[str, Any]) -> dict[str, Any]:
    [only] = pod_template["spec"]["containers"]
    return only


def test_operator_pytorchjob_has_master_workers_gpus_and_torchrun() -> None:
    spec, plan = planned()
    stage = plan.stage("classifier")
    body = pytorch_job(Attempt(OWNER, stage, spec, 2, init_checkpoint="s3://ulmfit/x/final"))
    assert body["apiVersion"] == "kubeflow.org/v1" and body["kind"] == "PyTorchJob"
    meta = body["metadata"]
    assert meta["name"] == "topics-classifier-a2" and meta["namespace"] == "team"
    assert meta["ownerReferences"] == [OWNER.reference()]
    assert meta["labels"]["ulmfit.io/stage"] == "classifier"
    assert meta["labels"]["ulmfit.io/attempt"] == "2"
    assert meta["annotations"]["ulmfit.io/init-checkpoint"] == "s3://ulmfit/x/final"
    replicas = body["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert body["spec"]["nprocPerNode"] == "2"
    assert body["spec"]["runPolicy"] == {"backoffLimit": 0, "cleanPodPolicy": "Running"}
    for role in ("Master", "Worker"):
        template = replicas[role]["template"]
        assert replicas[role]["restartPolicy"] == "Never"
        pod = template["spec"]
        main = container(template)
        assert main["name"] == "pytorch"
        assert main["image"] == "registry.example/trainer:1"
        assert main["command"][:3] == ["torchrun", "--nnodes=3", "--nproc-per-node=2"]
        assert "--master-addr=$(MASTER_ADDR)" in main["command"]
        assert main["command"][-5:] == [
            "-m",
            "ulmfit_trainer",
            "classifier",
            "--config",
            "/etc/ulmfit/stage.json",
        ]
        assert main["ports"] == [{"containerPort": 23456, "name": "pytorchjob-port"}]
        assert main["resources"]["limits"] == {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "2"}
        env = {e["name"]: e for e in main["env"]}
        assert env["MY_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "s3-keys",
            "key": "AWS_ACCESS_KEY_ID",
        }
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == (
            "AWS_SECRET_ACCESS_KEY"
        )
        context = main["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["nodeSelector"] == {"pool": "gpu"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["stage-config"]["configMap"]["name"] == "topics-classifier-a2-config"
        mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
        assert mounts["/etc/ulmfit"]["readOnly"] is True


def test_operator_cpu_job_without_workers_or_gpus() -> None:
    spec, plan = planned({"storage": SPEC["storage"]})
    body = pytorch_job(Attempt(OWNER, plan.stage("finetune"), spec, 1))
    assert set(body["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    limits = container(body["spec"]["pytorchReplicaSpecs"]["Master"]["template"])["resources"]
    assert "nvidia.com/gpu" not in limits["limits"]
    assert "annotations" not in body["metadata"]


def test_operator_evaluate_is_a_single_pod_batch_job() -> None:
    spec, plan = planned()
    body = evaluate_job(Attempt(OWNER, plan.stage("evaluate"), spec, 1))
    assert body["apiVersion"] == "batch/v1" and body["kind"] == "Job"
    assert body["spec"]["backoffLimit"] == 0
    template = body["spec"]["template"]
    assert template["spec"]["restartPolicy"] == "Never"
    main = container(template)
    assert main["command"] == [
        "python",
        "-m",
        "ulmfit_trainer",
        "evaluate",
        "--config",
        "/etc/ulmfit/stage.json",
    ]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "ports" not in main


def test_operator_config_map_holds_the_stage_config() -> None:
    _, plan = planned()
    stage = plan.stage("classifier")
    body = stage_config_map(OWNER, "topics-classifier-a1", stage, attempt=1)
    assert body["metadata"]["name"] == "topics-classifier-a1-config"
    assert body["metadata"]["ownerReferences"] == [OWNER.reference()]
    config = StageConfig.model_validate(json.loads(body["data"]["stage.json"]))
    assert config == stage.config
    assert config.init_from == "finetune" and config.run == "team/topics"


def test_operator_child_names_are_deterministic_and_fit() -> None:
    assert child_name("topics", "finetune", 3) == "topics-finetune-a3"
    assert child_name("1abc", "finetune", 1) == "u1abc-finetune-a1"
    long = "a" * 63
    name = child_name(long, "classifier", 12)
    assert len(name) <= MAX_CHILD_NAME and name.endswith("-classifier-a12")
    assert name == child_name(long, "classifier", 12)
    assert name != child_name("a" * 62 + "b", "classifier", 12)


def _pytorchjob(conditions: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    _, plan = planned({"storage": SPEC["storage"]})
    spec = parse_spec({"storage": SPEC["storage"]})
    body = pytorch_job(Attempt(OWNER, plan.stage("finetune"), spec, 1))
    body["metadata"].update(
        {"creationTimestamp": "2026-03-01T12:00:00Z", "resourceVersion": "9"}, **extra
    )
    body["status"] = {"conditions": conditions}
    return body


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        ([], ChildPhase.PENDING),
        ([{"type": "Created", "status": "True"}], ChildPhase.PENDING),
        (
            [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}],
            ChildPhase.RUNNING,
        ),
        (
            [{"type": "Running", "status": "False"}, {"type": "Succeeded", "status": "True"}],
            ChildPhase.SUCCEEDED,
        ),
        (
            [
                {"type": "Running", "status": "False"},
                {"type": "Failed", "status": "True", "reason": "Evicted", "message": "node gone"},
            ],
            ChildPhase.FAILED,
        ),
    ],
)
def test_operator_reads_pytorchjob_conditions(
    conditions: list[dict[str, str]], phase: ChildPhase
) -> None:
    child = observe_child(_pytorchjob(conditions))
    assert child is not None
    assert child.phase == phase
    assert child.stage == "finetune" and child.attempt == 1 and child.job == "topics"
    assert child.owner_uid == "uid-1"
    if phase == ChildPhase.FAILED:
        assert child.message == "Evicted: node gone"
    assert child.active is (phase in (ChildPhase.PENDING, ChildPhase.RUNNING))


def test_operator_reads_batch_job_status() -> None:
    spec, plan = planned()
    body = evaluate_job(Attempt(OWNER, plan.stage("evaluate"), spec, 1))
    body["status"] = {"active": 1}
    child = observe_child(body)
    assert child is not None and child.phase == ChildPhase.RUNNING
    body["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    child = observe_child(body)
    assert child is not None and child.phase == ChildPhase.SUCCEEDED


def test_operator_stopped_child_is_no_longer_active() -> None:
    body = _pytorchjob([{"type": "Running", "status": "True"}])
    patch = stop_patch("PyTorchJob", "ProgressDeadlineExceeded")
    assert patch["spec"] == {"runPolicy": {"suspend": True}}
    body["metadata"]["annotations"] = patch["metadata"]["annotations"]
    child = observe_child(body)
    assert child is not None and child.stopped == "ProgressDeadlineExceeded"
    assert not child.active
    assert ANNOTATION_STOPPED in patch["metadata"]["annotations"]
    assert stop_patch("Job", "x")["spec"] == {"suspend": True}


def test_operator_foreign_objects_are_not_children() -> None:
    assert observe_child({"kind": "PyTorchJob", "metadata": {"name": "x", "labels": {}}}) is None
    assert observe_child({"kind": "Pod", "metadata": {"labels": {"ulmfit.io/job": "x"}}}) is None


# ----------------------------------------------------------------------------- the tune stage

TUNE = {"space": {"learningRate": {"type": "uniform", "low": 0.001, "high": 0.01}}}


def tuned(**tune: Any) -> tuple[Any, Any]:
    return planned({**SPEC, "stages": {"tune": {**TUNE, **tune}}})


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_operator_tune_pod_runs_the_sweep_with_the_dashboard_on_its_loopback() -> None:
    spec, plan = tuned(gpusPerTrial=0.5, concurrentTrials=3)
    stage = plan.stage("tune")
    body = tune_job(Attempt(OWNER, stage, spec, 1))
    assert body["kind"] == "Job" and body["metadata"]["name"] == "topics-tune-a1"
    assert body["spec"]["backoffLimit"] == 0
    template = body["spec"]["template"]
    main = container(template)
    assert main["command"] == [
        "python",
        "-m",
        "ulmfit_trainer",
        "tune",
        "--config",
        "/etc/ulmfit/stage.json",
    ]
    env = {e["name"]: e.get("value") for e in main["env"]}
    # The job-submission API has no authentication: only a port-forward (inside the pod) reaches
    # it.
    assert env["ULMFIT_RAY_DASHBOARD_HOST"] == "127.0.0.1"
    assert env["ULMFIT_RAY_DASHBOARD_PORT"] == "8265"
    assert main["ports"] == [{"name": "dashboard", "containerPort": 8265}]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "2"  # ceil(0.5 x 3)
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert template["spec"]["automountServiceAccountToken"] is False
    service = dashboard_service(OWNER)
    assert service["metadata"]["name"] == "topics-tune-dashboard"
    assert service["metadata"]["ownerReferences"] == [OWNER.reference()]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "dashboard", "port": 8265, "targetPort": "dashboard", "protocol": "TCP"}
    ]
    assert selects(service["spec"]["selector"], template["metadata"]["labels"])
    # Not the pods of other stages.
    classifier = pytorch_job(Attempt(OWNER, plan.stage("classifier"), spec, 1))
    master = classifier["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert not selects(service["spec"]["selector"], master["metadata"]["labels"])


def test_operator_tune_gpus_follow_concurrency_or_the_worker_size() -> None:
    spec, plan = tuned()
    assert tune_gpus(plan.stage("tune").config.tune, spec) == 0
    spec, plan = tuned(gpusPerTrial=0.25)
    assert tune_gpus(plan.stage("tune").config.tune, spec) == 2  # resources.gpusPerWorker
    spec, plan = tuned(gpusPerTrial=1, concurrentTrials=4)
    assert tune_gpus(plan.stage("tune").config.tune, spec) == 4


def test_operator_tune_rayjob_has_a_head_workers_and_the_entrypoint() -> None:
    spec, plan = tuned(backend="rayjob")
    stage = plan.stage("tune")
    attempt = Attempt(OWNER, stage, spec, 1, "s3://ulmfit/ft/final")
    body = child_workload(attempt, TuneBackend.RAYJOB)
    assert body == tune_rayjob(attempt)
    assert body["apiVersion"] == "ray.io/v1" and body["kind"] == "RayJob"
    assert body["metadata"]["ownerReferences"] == [OWNER.reference()]
    assert body["metadata"]["labels"]["ulmfit.io/stage"] == "tune"
    ray = body["spec"]
    assert ray["entrypoint"] == "python -m ulmfit_trainer tune --config /etc/ulmfit/stage.json"
    assert ray["shutdownAfterJobFinishes"] is True
    head = ray["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_container = container(head["template"])
    assert {"name": "dashboard", "containerPort": 8265} in head_container["ports"]
    mounts = {m["mountPath"] for m in head_container["volumeMounts"]}
    assert "/etc/ulmfit" in mounts
    [workers] = ray["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 2  # resources.workers - 1
    service = dashboard_service(OWNER)
    assert selects(service["spec"]["selector"], head["template"]["metadata"]["labels"])
    assert not selects(service["spec"]["selector"], workers["template"]["metadata"]["labels"])
    # KubeRay's submitter pod is ours: the job's labels, non-root, no API token, small.
    submitter = ray["submitterPodTemplate"]
    assert submitter["metadata"]["labels"]["ulmfit.io/job"] == OWNER.name
    assert submitter["metadata"]["labels"]["ulmfit.io/role"] == "ray-submitter"
    pod = submitter["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    submit = container(submitter)
    assert "command" not in submit  # KubeRay writes the `ray job submit` command
    assert submit["image"] == head_container["image"]
    assert submit["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    # A single-worker job: the head alone runs the trials.
    one = {**SPEC, "resources": {**SPEC["resources"], "workers": 1}}
    spec, plan = planned({**one, "stages": {"tune": TUNE}})
    alone = tune_rayjob(Attempt(OWNER, plan.stage("tune"), spec, 1))
    assert "workerGroupSpecs" not in alone["spec"]["rayClusterSpec"]


@pytest.mark.parametrize(
    ("status", "spec", "phase"),
    [
        ({}, {}, ChildPhase.PENDING),
        ({"jobDeploymentStatus": "Initializing"}, {}, ChildPhase.PENDING),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, {}, ChildPhase.RUNNING),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, {}, ChildPhase.SUCCEEDED),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}, {}, ChildPhase.FAILED),
        ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, {}, ChildPhase.FAILED),
        ({"jobDeploymentStatus": "Running"}, {"suspend": True}, ChildPhase.SUSPENDED),
    ],
)
def test_operator_rayjob_status_reads_back_as_a_phase(
    status: dict[str, Any], spec: dict[str, Any], phase: ChildPhase
) -> None:
    parsed, plan = tuned(backend="rayjob")
    body = tune_rayjob(Attempt(OWNER, plan.stage("tune"), parsed, 3))
    body["metadata"]["creationTimestamp"] = "2026-03-01T12:00:00Z"
    body["spec"].update(spec)
    body["status"] = status
    seen = observe_child(body)
    assert seen is not None
    assert (seen.kind, seen.stage, seen.attempt, seen.owner_uid) == ("RayJob", "tune", 3, "uid-1")
    assert seen.phase == phase
    if status.get("reason"):
        assert "DeadlineExceeded" in seen.message


def test_operator_stopping_a_rayjob_suspends_it() -> None:
    assert stop_patch("RayJob", "ProgressDeadlineExceeded") == {
        "metadata": {"annotations": {ANNOTATION_STOPPED: "ProgressDeadlineExceeded"}},
        "spec": {"suspend": True},
    }


def test_operator_dashboard_service_name_fits_a_dns_label() -> None:
    long = "a" * 63
    name = dashboard_service_name(long)
    assert len(name) <= 63 and name.endswith("-tune-dashboard")
    assert name != dashboard_service_name("a" * 62)


# ----------------------------------------------------------------------------------- images


def images_in(node: Any) -> list[str]:
    """Every container image a child body names (containers, init containers, anywhere)."""
    if isinstance(node, dict):
        found = [node["image"]] if isinstance(node.get("image"), str) else []
        return found + [image for value in node.values() for image in images_in(value)]
    if isinstance(node, list):
        return [image for value in node for image in images_in(value)]
    return []


def test_operator_every_child_runs_only_the_jobs_trainer_image() -> None:
    """The operator's image checks (settings, admission policy) bound spec.resources.image; that
    holds only while every container of every child kind runs that image and no other."""
    spec, plan = planned(
        {
            **SPEC,
            "stages": {"pretrain": {"enabled": True}, "tune": {**TUNE, "backend": "rayjob"}},
        }
    )
    kinds = set()
    for stage in plan.stages:
        backends = [TuneBackend.POD, TuneBackend.RAYJOB] if stage.kind == "tune" else [None]
        for backend in backends:
            attempt = Attempt(OWNER, stage, spec, 1)
            body = child_workload(attempt, backend) if backend else child_workload(attempt)
            kinds.add(body["kind"])
            images = images_in(body)
            assert images and set(images) == {"registry.example/trainer:1"}, (stage.name, images)
    assert kinds == {"PyTorchJob", "Job", "RayJob"}
    # The other objects a stage creates run nothing.
    assert images_in(dashboard_service(OWNER)) == []
    assert images_in(stage_config_map(OWNER, "topics-tune-a1", plan.stage("tune"), 1)) == []


def test_operator_every_emptydir_has_a_size_limit_from_the_spec() -> None:
    spec, plan = planned({**SPEC, "resources": {**SPEC["resources"], "scratch": "5Gi",
                                                "sharedMemory": "512Mi"}})  # fmt: skip
    attempt = Attempt(OWNER, plan.stage("classifier"), spec, 1)
    master = pytorch_job(attempt)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    volumes = {v["name"]: v for v in master["spec"]["volumes"]}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "5Gi"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "512Mi"}
    # The defaults, on every kind of child.
    spec, plan = tuned(backend="rayjob")
    bodies = [
        tune_rayjob(Attempt(OWNER, plan.stage("tune"), spec, 1)),
        tune_job(Attempt(OWNER, plan.stage("tune"), spec, 1)),
        evaluate_job(Attempt(OWNER, plan.stage("evaluate"), spec, 1)),
        pytorch_job(Attempt(OWNER, plan.stage("classifier"), spec, 1)),
    ]
    empty_dirs = [volume["emptyDir"] for volume in _all_volumes(bodies) if "emptyDir" in volume]
    assert len(empty_dirs) >= 8
    assert all(d.get("sizeLimit") for d in empty_dirs), empty_dirs
    assert {"medium": "Memory", "sizeLimit": "2Gi"} in empty_dirs
    assert {"sizeLimit": "20Gi"} in empty_dirs


def _all_volumes(tree: Any) -> list[dict[str, Any]]:
    """Every item of every `volumes` list anywhere in these objects."""
    found: list[dict[str, Any]] = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "volumes" and isinstance(value, list):
                found.extend(value)
            else:
                found.extend(_all_volumes(value))
    elif isinstance(tree, list):
        for item in tree:
            found.extend(_all_volumes(item))
    return found


def _pod_templates(tree: Any) -> list[dict[str, Any]]:
    """Every pod template (an object with metadata and a spec holding containers) in these."""
    found: list[dict[str, Any]] = []
    if isinstance(tree, dict):
        if "containers" in (tree.get("spec") or {}) and "metadata" in tree:
            found.append(tree)
        for value in tree.values():
            found.extend(_pod_templates(value))
    elif isinstance(tree, list):
        for item in tree:
            found.extend(_pod_templates(item))
    return found


def test_operator_network_policy_fences_every_pod_of_the_job_and_only_them() -> None:
    network = PodNetwork(
        s3_cidrs=("10.20.0.0/16",),
        ray_operator_labels=(("app.kubernetes.io/name", "kuberay-operator"),),
    )
    policy = network_policy(OWNER, 9000, network)
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    assert policy["metadata"]["name"] == "topics-pods"
    assert policy["metadata"]["ownerReferences"] == [OWNER.reference()]
    fence = policy["spec"]
    assert fence["policyTypes"] == ["Ingress", "Egress"]
    selector = fence["podSelector"]["matchLabels"]
    # Every pod of every child kind (PyTorchJob replicas, Ray head, workers and the submitter,
    # the tune pod, evaluate) is inside the fence; another job's are not.
    spec, plan = tuned(backend="rayjob")
    bodies = [
        tune_rayjob(Attempt(OWNER, plan.stage("tune"), spec, 1)),
        tune_job(Attempt(OWNER, plan.stage("tune"), spec, 2)),
        evaluate_job(Attempt(OWNER, plan.stage("evaluate"), spec, 1)),
        pytorch_job(Attempt(OWNER, plan.stage("classifier"), spec, 1)),
    ]
    templates = _pod_templates(bodies)
    assert len(templates) >= 6
    assert all(selects(selector, t["metadata"]["labels"]) for t in templates)
    other = pytorch_job(Attempt(Owner("other", "ml", "u2"), plan.stage("classifier"), spec, 1))
    assert not any(selects(selector, t["metadata"]["labels"]) for t in _pod_templates(other))
    # Ingress: the job's own pods; the dashboard port from the KubeRay operator's pods.
    own, dashboard = fence["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": selector}}]}
    assert dashboard == {
        "from": [
            {
                "namespaceSelector": {},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
            }
        ],
        "ports": [{"port": 8265, "protocol": "TCP"}],
    }
    # Egress: own pods, DNS, the S3 port at the allowed networks. No rule without ports or
    # peers (which would open everything).
    to_own, dns, s3 = fence["egress"]
    assert to_own == {"to": [{"podSelector": {"matchLabels": selector}}]}
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert s3 == {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
                  "ports": [{"port": 9000, "protocol": "TCP"}]}  # fmt: skip
    # Without KubeRay labels nothing outside the job gets in.
    closed = network_policy(OWNER, 9000, PodNetwork(ray_operator_labels=()))
    assert len(closed["spec"]["ingress"]) == 1


def test_operator_can_write_every_kind_of_child_it_builds() -> None:
    """The REST client finds each child kind's resource path: a new kind in `KINDS` without one
    would fail its first create, which no pure test sees."""
    from ulmfit_operator.children import KINDS, OPTIONAL_KINDS
    from ulmfit_operator.runtime.kube import PLURALS

    for kind in KINDS:
        assert [plural for (_, known), plural in PLURALS.items() if known == kind], kind
    for kind, (api_version, plural) in OPTIONAL_KINDS.items():
        assert PLURALS[(api_version, kind)] == plural
