"""Gang scheduling through the real Kubeflow Training Operator, on the real one-node cluster.

The Training Operator runs here with `--gang-scheduler-name=scheduler-plugins-scheduler` (its
scheduler-plugins integration): for each PyTorchJob it makes a `scheduling.x-k8s.io` PodGroup
from the job's `runPolicy.schedulingPolicy` and gives every pod that scheduler. The coscheduling
scheduler itself does not run here, so the pods stay unscheduled: which is also what the
operator's pending deadline is for. The PodGroup CRD is a minimal one of ours (the API must
serve the kind; its schema does not matter to the Training Operator). The Training Operator is
put back to its usual flags afterwards, for the other tests of the session.
"""

# The shared fixtures are imported from test_cluster_jobs, so their names come back as test
# parameters:
# ruff: noqa: F811

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cluster_jobs import Cluster, bucket, cluster, tiny_job  # noqa: F401
from tests.harness.cluster import ClusterOperator
from tests.harness.kube import apply_manifests
from tests.harness.ports import wait_for
from tests.harness.s3 import SeaweedS3

pytestmark = pytest.mark.slow

GANG_SCHEDULER = "scheduler-plugins-scheduler"
PODGROUP_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "podgroups.scheduling.x-k8s.io"},
    "spec": {
        "group": "scheduling.x-k8s.io",
        "scope": "Namespaced",
        "names": {"kind": "PodGroup", "plural": "podgroups", "singular": "podgroup"},
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


@pytest.fixture
def gang_training_operator(cluster: Cluster) -> Any:
    with cluster.node.api_client() as api:
        apply_manifests(api, [PODGROUP_CRD])
    cluster.node.restart_training_operator(gang_scheduler=GANG_SCHEDULER)
    try:
        yield cluster.node
    finally:
        cluster.node.restart_training_operator()


@pytest.mark.usefixtures("gang_training_operator")
def test_a_two_pod_stage_is_one_gang_and_waits_whole_until_its_pending_deadline(
    cluster: Cluster,
    cluster_operator: ClusterOperator,
    cluster_s3: SeaweedS3,
    bucket: str,
    tmp_path: Path,
) -> None:
    """A two-worker stage with `schedulingPolicy` and the gang scheduler's name: the Training
    Operator makes one PodGroup of both pods (minMember 2, the queue and priority class given)
    and hands both pods to that scheduler; unscheduled, the attempt is stopped at its pending
    deadline and, with no retry left, the job fails saying so."""
    job = tiny_job("gang", cluster_operator, cluster_s3, bucket, **{
        "resources.workers": 2,
        "resources.podTemplate": {"schedulerName": GANG_SCHEDULER},
        "runPolicy.schedulingPolicy": {"queue": "training", "scheduleTimeoutSeconds": 60},
        "runPolicy.pendingDeadlineSeconds": 30,
        "runPolicy.backoffLimit": 0,
    })  # fmt: skip
    cluster.apply(job, tmp_path)
    def created() -> dict[str, Any] | None:
        stages = cluster.job("gang").get("status", {}).get("stages") or []
        return next((e for e in stages if e.get("child")), None)

    entry = wait_for(created, 120, "the first stage's first attempt", interval=2)

    def podgroup() -> dict[str, Any] | None:
        found = cluster.get("podgroups.scheduling.x-k8s.io")["items"]
        return next((g for g in found if g["metadata"]["name"] == entry["child"]), None)

    group = wait_for(podgroup, 120, "the Training Operator's PodGroup", interval=2)
    assert group["spec"]["minMember"] == 2, group
    assert group["spec"].get("scheduleTimeoutSeconds") == 60, group

    def pods() -> list[dict[str, Any]] | None:
        found = cluster.get("pods", selector=f"ulmfit.io/job=gang,ulmfit.io/stage={entry['name']}")
        return found["items"] if len(found["items"]) == 2 else None

    for pod in wait_for(pods, 120, "both pods of the gang", interval=2):
        assert pod["spec"]["schedulerName"] == GANG_SCHEDULER
        assert "nodeName" not in pod["spec"]  # nothing placed half the gang

    finished = cluster.wait_finished("gang", timeout=300)
    failed = {c["type"]: c for c in finished["status"]["conditions"]}["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded", failed
    assert "PendingDeadlineExceeded" in failed["message"], failed
