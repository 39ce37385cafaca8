"""The new stages on real parts: co-trained models in parallel, the tune stage as a pod with a
dashboard Service, or as a KubeRay RayJob where that CRD is installed.

The controllers are played by the harness's `Trainer` (no KubeRay runs here: only its RayJob CRD
is installed); tests/e2e/test_cluster_jobs.py runs the RayJob sweep under the real KubeRay.
"""

# The shared fixtures are imported from the harness module, so their names come back as
# test parameters:
# ruff: noqa: F811

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from ulmfit_operator.runtime.kube import Kube
from ulmfit_trainer.config import StageConfig

from tests.harness.crds import ray_crds
from tests.harness.kube import ControlPlane, apply_manifests, load_manifests
from tests.harness.ports import wait_for
from tests.harness.s3 import SeaweedS3
from tests.integration.test_operator_harness import (  # noqa: F401 - fixtures
    OperatorProcess,
    Trainer,
    admin,
    condition,
    create_job,
    events,
    is_true,
    job_spec,
    list_children,
    operator_crds,
    operator_kubeconfig,
    start_operator,
    trainer,
    wait_child,
    wait_job,
)

pytestmark = pytest.mark.timeout(300)

TUNE = {"space": {"learningRate": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
COTRAIN = {
    "models": [
        {"name": "rules", "rules": [{"label": "a", "keywords": ["alpha"]}]},
        {"name": "tail", "rules": [{"label": "b", "keywords": ["beta"]}], "truncation": "tail"},
    ],
    "minAgreement": 2,
}


# A minimal RayJob CRD: what the API server needs to serve ray.io/v1 RayJobs (KubeRay's own CRD
# validates far more; the operator only creates, watches and patches them).
def config_of(admin: Kube, child: dict[str, Any]) -> StageConfig:
    meta = child["metadata"]
    config_map = admin.request(
        "GET", f"/api/v1/namespaces/{meta['namespace']}/configmaps/{meta['name']}-config"
    )
    return StageConfig.model_validate(json.loads(config_map["data"]["stage.json"]))


@pytest.mark.slow
def test_operator_cotrain_models_run_in_parallel_then_the_classifier(
    start_operator,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    kube_namespace: str,
) -> None:
    start_operator()
    ns, name = kube_namespace, "weak"
    create_job(admin, ns, name, job_spec(s3_server, s3_bucket, stages={"cotrain": COTRAIN}))
    finetune_uri = trainer.complete(wait_child(admin, ns, f"{name}-finetune-a1"))
    # Both models start at once, each from the fine-tuned LM, each its own PyTorchJob.
    rules = wait_child(admin, ns, f"{name}-cotrain-rules-a1")
    tail = wait_child(admin, ns, f"{name}-cotrain-tail-a1")
    for child, model in ((rules, "rules"), (tail, "tail")):
        assert child["kind"] == "PyTorchJob"
        assert child["metadata"]["annotations"]["ulmfit.io/init-checkpoint"] == finetune_uri
        command = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][
            0
        ]["command"]
        assert command[-4:] == ["ulmfit_trainer", "cotrain", "--config", "/etc/ulmfit/stage.json"]
        config = config_of(admin, child)
        assert (config.stage, config.key, config.cotrain_model) == (
            "cotrain",
            f"cotrain-{model}",
            model,
        )
    job = wait_job(
        admin,
        ns,
        name,
        lambda j: (j.get("status") or {}).get("currentStage") == "cotrain-rules,cotrain-tail",
        "both cotrain stages current",
    )
    # One model finishes: the classifier still waits for the other.
    trainer.complete(rules, {"validAccuracy": 0.7})
    wait_job(
        admin,
        ns,
        name,
        lambda j: any(
            s["name"] == "cotrain-rules" and s["state"] == "Succeeded"
            for s in (j.get("status") or {}).get("stages", [])
        ),
        "cotrain-rules succeeded",
    )
    names = [c["metadata"]["name"] for c in list_children(admin, ns, name)]
    assert f"{name}-classifier-a1" not in names
    # The other finishes: the classifier starts, reading both models' pseudo-labels.
    trainer.complete(tail, {"validAccuracy": 0.6})
    classifier = wait_child(admin, ns, f"{name}-classifier-a1")
    assert config_of(admin, classifier).pseudo_labels_from == ["cotrain-rules", "cotrain-tail"]
    job = wait_job(
        admin,
        ns,
        name,
        lambda j: (j.get("status") or {}).get("currentStage") == "classifier",
        "classifier current",
    )
    stages = {s["name"]: s for s in job["status"]["stages"]}
    assert stages["cotrain-tail"]["kind"] == "cotrain"
    assert stages["cotrain-tail"]["metrics"] == {"validAccuracy": 0.6}
    # Exactly one child per stage so far.
    assert sorted(c["metadata"]["name"] for c in list_children(admin, ns, name)) == sorted(
        f"{name}-{stage}-a1"
        for stage in ("finetune", "cotrain-rules", "cotrain-tail", "classifier")
    )


@pytest.mark.slow
def test_operator_tune_pod_with_dashboard_service_and_retries(
    start_operator,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    kube_namespace: str,
) -> None:
    start_operator()
    ns, name = kube_namespace, "sweep"
    spec = job_spec(
        s3_server,
        s3_bucket,
        stages={"finetune": {"enabled": False}, "tune": {**TUNE, "backend": "pod"}},
        runPolicy={"backoffLimit": 1},
    )
    create_job(admin, ns, name, spec)
    child = wait_child(admin, ns, f"{name}-tune-a1")
    assert child["kind"] == "Job"
    template = child["spec"]["template"]
    [container] = template["spec"]["containers"]
    assert container["command"] == [
        "python",
        "-m",
        "ulmfit_trainer",
        "tune",
        "--config",
        "/etc/ulmfit/stage.json",
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ULMFIT_RAY_DASHBOARD_HOST"] == "127.0.0.1"
    assert env["ULMFIT_RAY_DASHBOARD_PORT"] == "8265"
    assert {"name": "dashboard", "containerPort": 8265, "protocol": "TCP"} in container["ports"]
    assert container["securityContext"]["runAsNonRoot"] is True
    service_name = f"{name}-tune-dashboard"
    service = wait_for(
        lambda: admin.request("GET", f"/api/v1/namespaces/{ns}/services/{service_name}"),
        30,
        "the dashboard Service",
    )
    assert service["spec"]["type"] == "ClusterIP"
    [port] = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (8265, "dashboard")
    selector = service["spec"]["selector"]
    labels = template["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in selector.items())
    [owner] = service["metadata"]["ownerReferences"]
    assert owner["kind"] == "ULMFiTJob" and owner["name"] == name
    port_forward = f"kubectl port-forward -n {ns} svc/{service_name} 8265:8265"
    job = wait_job(admin, ns, name, lambda j: (j.get("status") or {}).get("tune"), "status.tune")
    assert job["status"]["tune"] == {
        "backend": "pod",
        "service": service_name,
        "dashboard": "http://localhost:8265",
        "portForward": port_forward,
    }
    # The NetworkPolicy around the job's pods, as the API server took it: it selects the tune pod
    # and is owned by the job.
    fence = admin.request(
        "GET", f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/{name}-pods"
    )
    assert all(labels.get(k) == v for k, v in fence["spec"]["podSelector"]["matchLabels"].items())
    assert fence["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert fence["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    started = wait_for(
        lambda: [
            e
            for e in events(admin, ns, name)
            if e["reason"] == "StageStarted" and "tune" in e["message"]
        ],
        20,
        "the StageStarted event",
    )
    assert port_forward in started[0]["message"]
    # A failed sweep is retried (backoffLimit 1), then fails the job.
    trainer.set_status(child, "Failed", "ray head pod OOMKilled")
    second = wait_child(admin, ns, f"{name}-tune-a2")
    trainer.set_status(second, "Failed", "ray head pod OOMKilled")
    job = wait_job(admin, ns, name, lambda j: is_true(j, "Failed"), "Failed")
    failed = condition(job, "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"
    assert "stage tune failed 2 times" in failed["message"]
    assert {c["metadata"]["name"] for c in list_children(admin, ns, name)} == {
        f"{name}-tune-a1",
        f"{name}-tune-a2",
    }


@pytest.fixture
def rayjob_crd(kube_cluster: ControlPlane, admin: Kube) -> Iterator[None]:
    """KubeRay's own RayJob CRD (with its full schema), served for this test only: other tests
    expect a cluster without it. No KubeRay controller runs here; tests/e2e/test_cluster_jobs.py
    runs the sweep under the real one."""
    with kube_cluster.api_client() as api:
        apply_manifests(api, load_manifests(ray_crds()[:1]))
    wait_for(
        lambda: admin.request("GET", "/apis/ray.io/v1/rayjobs", query=[("limit", "1")]),
        60,
        "RayJobs to be served",
    )
    yield
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/rayjobs.ray.io"
    try:
        admin.request("DELETE", path)
    except ApiException as error:
        if error.status != 404:
            raise


@pytest.mark.slow
def test_operator_tune_becomes_a_rayjob_where_kuberay_is_installed(
    rayjob_crd: None,
    start_operator,
    admin: Kube,
    s3_server: SeaweedS3,
    s3_bucket: str,
    kube_namespace: str,
) -> None:
    start_operator()  # after the CRD: the operator discovers and watches RayJobs at start
    ns, name = kube_namespace, "raysweep"
    spec = job_spec(
        s3_server,
        s3_bucket,
        stages={"finetune": {"enabled": False}, "tune": TUNE},
        runPolicy={"backoffLimit": 0},
    )
    create_job(admin, ns, name, spec)

    def rayjob() -> dict[str, Any] | None:
        found = admin.list("ray.io/v1", "rayjobs", ns, f"ulmfit.io/job={name}")
        return found[0] if found else None

    body = wait_for(rayjob, 60, "the RayJob")
    assert body["metadata"]["name"] == f"{name}-tune-a1"
    assert body["spec"]["entrypoint"] == (
        "python -m ulmfit_trainer tune --config /etc/ulmfit/stage.json"
    )
    assert body["spec"]["shutdownAfterJobFinishes"] is True
    head = body["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    service = wait_for(
        lambda: admin.request("GET", f"/api/v1/namespaces/{ns}/services/{name}-tune-dashboard"),
        30,
        "the dashboard Service",
    )
    selector = service["spec"]["selector"]
    assert all(head["metadata"]["labels"].get(k) == v for k, v in selector.items())
    job = wait_job(admin, ns, name, lambda j: (j.get("status") or {}).get("tune"), "status.tune")
    assert job["status"]["tune"]["backend"] == "rayjob"
    assert not list_children(admin, ns, name)  # no batch Job, no PyTorchJob
    # KubeRay reports the Ray job failed: with backoffLimit 0 the job fails, naming it.
    admin.merge_patch(
        Trainer.ref(body),
        {
            "status": {
                "jobStatus": "FAILED",
                "jobDeploymentStatus": "Failed",
                "reason": "AppFailed",
                "message": "trial runner crashed",
            }
        },
        sub="status",
    )
    job = wait_job(admin, ns, name, lambda j: is_true(j, "Failed"), "Failed")
    failed = condition(job, "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"
    assert "trial runner crashed" in failed["message"]
