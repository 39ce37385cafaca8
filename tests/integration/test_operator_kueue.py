"""The operator under the real Kueue controller: a real API server, real Kueue, real S3, the
operator as a process. No kubelet runs here, so admitted children stay without pods. Kueue
itself admits and holds children, the operator itself reacts; the one part played is the
garbage collector's (no kube-controller-manager runs here): once the operator has deleted a
child, the test deletes the Kueue Workload that child owned, which is what frees its quota.
tests/e2e/test_cluster_jobs.py runs a queued job under Kueue on the real one-node cluster, where
the real garbage collector does that."""

# The shared fixtures are imported from the harness modules, so their names come back as
# test parameters:
# ruff: noqa: F811

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.harness.kueue import (  # noqa: F401 - fixture
    create_queue,
    delete_queue,
    kueue,
    workloads_of,
)
from tests.harness.ports import wait_for
from tests.harness.s3 import SeaweedS3
from tests.integration.test_operator_harness import (  # noqa: F401 - fixtures
    OperatorProcess,
    admin,
    condition,
    create_job,
    get_job,
    is_true,
    job_spec,
    jobs_namespace,
    list_children,
    operator_crds,
    operator_kubeconfig,
    patch_job_spec,
    start_operator,
    wait_job,
)

pytestmark = pytest.mark.timeout(300)


def _suspended(child: dict[str, Any]) -> bool:
    return bool(((child.get("spec") or {}).get("runPolicy") or {}).get("suspend"))


def test_two_jobs_share_a_queue_with_room_for_one_and_the_second_waits_its_turn(
    kueue,
    start_operator,
    admin,
    kube_cluster,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    ns = jobs_namespace
    with kube_cluster.api_client() as api:
        queue = create_queue(api, ns, {"cpu": "1", "memory": "1Gi"})
    operator: OperatorProcess = start_operator()
    try:
        spec = job_spec(s3_server, s3_bucket, queueName=queue.local_queue)
        create_job(admin, ns, "first", spec)
        wait_for(lambda: list_children(admin, ns, "first"), 60, "the first job's child")
        create_job(admin, ns, "second", spec)

        # Kueue admits the first job's child (it unsuspends it) and holds the second's.
        def admitted_one() -> bool:
            children = list_children(admin, ns)
            return len(children) == 2 and sorted(_suspended(c) for c in children) == [False, True]

        wait_for(admitted_one, 90, "Kueue to admit one child of two")
        [first] = list_children(admin, ns, "first")
        [second] = list_children(admin, ns, "second")
        assert not _suspended(first) and _suspended(second)
        for child in (first, second):
            assert child["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue.local_queue
        waiting = wait_job(
            admin, ns, "second", lambda j: is_true(j, "Queued"), "its Queued condition"
        )
        queued = condition(waiting, "Queued")
        assert queued is not None and queued["reason"] == "WaitingForAdmission"
        assert f"LocalQueue {queue.local_queue}" in queued["message"]
        [entry] = [s for s in waiting["status"]["stages"] if s.get("queuedSince")]
        assert entry["state"] == "Pending" and entry["failures"] == 0
        queued_series = [
            line
            for line in operator.metrics_text().splitlines()
            if line.startswith("ulmfit_stage_queued_seconds{") and 'job="second"' in line
        ]
        assert len(queued_series) == 1 and f'stage="{entry["name"]}"' in queued_series[0]
        # Several resyncs later (one a second here) the waiting job still has its one child.
        time.sleep(3)
        assert len(list_children(admin, ns, "second")) == 1
        assert not is_true(get_job(admin, ns, "first"), "Queued")

        # The first job suspended: its child goes, Kueue admits the second's, which runs on.
        first_uid = first["metadata"]["uid"]
        patch_job_spec(admin, ns, "first", {"runPolicy": {"suspend": True}})
        wait_for(lambda: not list_children(admin, ns, "first"), 60, "the first child deleted")
        with kube_cluster.api_client() as api:
            for workload in workloads_of(api, ns, first_uid):  # the garbage collector's part
                admin.request(
                    "DELETE",
                    f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/workloads/"
                    f"{workload['metadata']['name']}",
                )

        def second_admitted() -> bool:
            children = list_children(admin, ns, "second")
            return len(children) == 1 and not _suspended(children[0])

        wait_for(second_admitted, 90, "Kueue to admit the second job's child")
        admitted = wait_job(
            admin,
            ns,
            "second",
            lambda j: (condition(j, "Queued") or {}).get("status") == "False",
            "its Queued condition to clear",
        )
        assert condition(admitted, "Queued")["reason"] == "Admitted"  # type: ignore[index]
        [after] = list_children(admin, ns, "second")
        assert after["metadata"]["name"] == second["metadata"]["name"]  # the same attempt
    finally:
        with kube_cluster.api_client() as api:
            delete_queue(api, queue)
