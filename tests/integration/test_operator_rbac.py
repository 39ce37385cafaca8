"""The operator works with exactly the rights in manifests/rbac, and they allow nothing else.

The Kubeflow Training Operator and the trainer are played by the harness's `Trainer` (see
tests/integration/test_operator_harness.py); tests/e2e/test_cluster_jobs.py runs the same
paths under the real controllers.
"""

# The shared fixtures are imported from the harness module, so their names come back as
# test parameters:
# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.runtime.kube import Kube

from tests.harness.kube import ControlPlane, least_privilege_kubeconfig, load_manifests
from tests.harness.s3 import SeaweedS3
from tests.integration.test_operator_harness import (  # noqa: F401 - fixtures
    CLUSTER_RBAC,
    RBAC_DIR,
    Trainer,
    admin,
    create_job,
    job_spec,
    jobs_namespace,
    operator_crds,
    operator_kubeconfig,
    run_to_success,
    start_operator,
    trainer,
)

pytestmark = pytest.mark.timeout(300)


def _as(kube_cluster: ControlPlane, kubeconfig: Path) -> Kube:
    return Kube(kube_cluster.api_client(kubeconfig), OperatorMetrics())


def _status(call) -> int:
    try:
        call()
    except ApiException as error:
        return int(error.status)
    return 200


def test_operator_rbac_grants_only_what_the_operator_uses() -> None:
    rules = {}
    for document in load_manifests(CLUSTER_RBAC):
        if document["kind"] in ("ClusterRole", "Role"):
            for rule in document["rules"]:
                for resource in rule["resources"]:
                    rules[(rule["apiGroups"][0], resource)] = set(rule["verbs"])
    assert rules == {
        ("ulmfit.io", "ulmfitjobs"): {"get", "list", "watch", "delete"},
        ("ulmfit.io", "ulmfitjobs/status"): {"patch"},
        ("ulmfit.io", "ulmfitjobs/finalizers"): {"update"},
        ("trainer.kubeflow.org", "trainjobs"): {
            "create", "get", "list", "watch", "patch", "delete"
        },
        ("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch", "patch", "delete"},
        ("batch", "jobs"): {"create", "get", "list", "watch", "patch", "delete"},
        ("ray.io", "rayjobs"): {"create", "get", "list", "watch", "patch", "delete"},
        ("", "configmaps"): {"create"},
        ("", "services"): {"create"},
        ("networking.k8s.io", "networkpolicies"): {"create"},
        ("", "pods"): {"list"},
        ("", "events"): {"create"},
        ("coordination.k8s.io", "leases"): {"get", "create", "update"},
    }
    for document in load_manifests(CLUSTER_RBAC):
        for rule in document.get("rules", []):
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
            assert "secrets" not in rule["resources"]
    # The namespaced variant grants the same, in one namespace.
    namespaced = {}
    for document in load_manifests([RBAC_DIR / "role_namespaced.yaml"]):
        for rule in document.get("rules", []):
            for resource in rule["resources"]:
                namespaced[(rule["apiGroups"][0], resource)] = set(rule["verbs"])
    assert namespaced == rules


def test_operator_account_is_refused_everything_else(
    kube_cluster: ControlPlane, operator_kubeconfig: Path, jobs_namespace: str
) -> None:
    ns = jobs_namespace
    operator = _as(kube_cluster, operator_kubeconfig)
    # Secrets, in its namespace or anywhere: never.
    assert _status(lambda: operator.request("GET", f"/api/v1/namespaces/{ns}/secrets")) == 403
    assert _status(lambda: operator.request("GET", "/api/v1/secrets")) == 403
    assert (
        _status(
            lambda: operator.request(
                "GET", "/api/v1/namespaces/ulmfit-system/secrets/ulmfit-operator-s3"
            )
        )
        == 403
    )
    # Pods: listed (why an attempt has not started), never read one by one, watched or made.
    assert _status(lambda: operator.request("GET", f"/api/v1/namespaces/{ns}/pods")) == 200
    assert (
        _status(lambda: operator.request("GET", f"/api/v1/namespaces/{ns}/pods/any-pod")) == 403
    )
    assert (
        _status(
            lambda: operator.request(
                "GET", f"/api/v1/namespaces/{ns}/pods", query=[("watch", "true")]
            )
        )
        == 403
    )
    # No reading ConfigMaps back, no spec changes to jobs.
    assert _status(lambda: operator.request("GET", f"/api/v1/namespaces/{ns}/configmaps")) == 403
    assert (
        _status(
            lambda: operator.request(
                "POST",
                f"/api/v1/namespaces/{ns}/pods",
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "x"},
                    "spec": {"containers": [{"name": "x", "image": "x"}]},
                },
            )
        )
        == 403
    )
    assert (
        _status(
            lambda: operator.request(
                "POST",
                "/apis/rbac.authorization.k8s.io/v1/clusterroles",
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRole",
                    "metadata": {"name": "escalate"},
                    "rules": [],
                },
            )
        )
        == 403
    )
    # What it needs works.
    assert (
        _status(
            lambda: operator.request("GET", f"/apis/ulmfit.io/v1alpha1/namespaces/{ns}/ulmfitjobs")
        )
        == 200
    )
    assert (
        _status(
            lambda: operator.create(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "probe", "namespace": ns},
                    "data": {},
                }
            )
        )
        == 200
    )


def test_operator_runs_cluster_wide_with_the_cluster_role(
    start_operator,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    operator = start_operator(namespace=None)
    create_job(admin, jobs_namespace, "rbac", job_spec(s3_server, s3_bucket))
    job = run_to_success(admin, trainer, jobs_namespace, "rbac")
    assert job["status"]["result"]["testMetrics"]["accuracy"] == 0.75
    log = operator.log_path.read_text()
    assert "Forbidden" not in log and " 403" not in log, operator.log_tail()
    assert operator.metric("ulmfit_reconcile_errors_total") == 0


def test_operator_runs_in_one_namespace_with_the_namespaced_role(
    start_operator,
    kube_cluster: ControlPlane,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
    operator_crds,
) -> None:
    ns = jobs_namespace
    account = "ulmfit-operator-ns"
    documents = load_manifests([RBAC_DIR / "role_namespaced.yaml"])
    for document in documents:
        document["metadata"]["namespace"] = ns
        for subject in document.get("subjects", []):
            subject.update({"name": account, "namespace": ns})
    kubeconfig = least_privilege_kubeconfig(kube_cluster, documents, ns, account)
    operator = start_operator(
        namespace=ns, kubeconfig=kubeconfig, lease_namespace=ns, identity="namespaced"
    )
    create_job(admin, ns, "scoped", job_spec(s3_server, s3_bucket))
    run_to_success(admin, trainer, ns, "scoped")
    log = operator.log_path.read_text()
    assert "Forbidden" not in log and " 403" not in log, operator.log_tail()
    # The Role reaches no further than its namespace.
    scoped = _as(kube_cluster, kubeconfig)
    assert _status(lambda: scoped.request("GET", "/apis/ulmfit.io/v1alpha1/ulmfitjobs")) == 403
    assert (
        _status(
            lambda: scoped.request("GET", "/apis/ulmfit.io/v1alpha1/namespaces/default/ulmfitjobs")
        )
        == 403
    )
