"""The real Kueue controller admits suspended jobs by quota, against a real API server.

Kueue (built by `tests/cluster/controllers/build.sh kueue`) runs as a host process on the
session's kube-apiserver; nothing else acts on the jobs, so no Pod ever starts. Where a job has
to finish, the test plays the Training Operator and writes the `Succeeded` condition into the
PyTorchJob's status through the status subresource, as that controller would once the pods are
done. What Kueue does in between (a Workload per job, quota reservation, unsuspending) is its own
code.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from tests.harness.kube import ControlPlane
from tests.harness.kueue import (  # noqa: F401 - the fixture
    KueueController,
    Queue,
    condition,
    create_queue,
    delete_queue,
    kueue,
    workloads_of,
)
from tests.harness.ports import wait_for

pytestmark = pytest.mark.timeout(120)

# One PyTorchJob (a single Master) asks for exactly the ClusterQueue's quota.
JOB_REQUESTS = {"cpu": "500m", "memory": "256Mi"}
ADMIT_TIMEOUT = 30.0


def _pytorchjob(name: str, queue: Queue) -> dict[str, Any]:
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "labels": queue.labels},
        "spec": {
            "runPolicy": {"suspend": True},
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "OnFailure",
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "pytorch",
                                    "image": "ulmfit-test/none:0",
                                    "resources": {"requests": JOB_REQUESTS},
                                }
                            ]
                        }
                    },
                }
            },
        },
    }


def _custom(api: Any) -> Any:
    return client.CustomObjectsApi(api)


def _get_pytorchjob(api: Any, namespace: str, name: str) -> dict[str, Any]:
    job: dict[str, Any] = _custom(api).get_namespaced_custom_object(
        "kubeflow.org", "v1", namespace, "pytorchjobs", name
    )
    return job


def _suspended(job: dict[str, Any]) -> bool:
    return bool(job["spec"].get("runPolicy", {}).get("suspend"))


def _pending_workload(api: Any, namespace: str, uid: str) -> dict[str, Any] | None:
    """The job's Workload once Kueue has tried and failed to reserve quota for it."""
    for workload in workloads_of(api, namespace, uid):
        reserved = condition(workload, "QuotaReserved")
        if reserved is not None and reserved["status"] == "False":
            return workload
    return None


def _admitted_workload(api: Any, namespace: str, uid: str) -> dict[str, Any] | None:
    for workload in workloads_of(api, namespace, uid):
        admitted = condition(workload, "Admitted")
        if admitted is not None and admitted["status"] == "True":
            return workload
    return None


@pytest.fixture
def one_job_queue(
    kube_cluster: ControlPlane,
    kueue: KueueController,  # noqa: F811 - the imported fixture
    kube_namespace: str,
) -> Iterator[Queue]:
    """A ClusterQueue whose quota is exactly one job's requests, fed from the namespace."""
    with kube_cluster.api_client() as api:
        queue = create_queue(api, kube_namespace, JOB_REQUESTS)
    yield queue
    with kube_cluster.api_client() as api:
        delete_queue(api, queue)


def test_quota_for_one_pytorchjob_admits_one_then_the_next(
    kube_cluster: ControlPlane, one_job_queue: Queue
) -> None:
    namespace = one_job_queue.namespace
    with kube_cluster.api_client() as api:
        uids = {}
        for name in ("first", "second"):
            created = _custom(api).create_namespaced_custom_object(
                "kubeflow.org", "v1", namespace, "pytorchjobs", _pytorchjob(name, one_job_queue)
            )
            uids[name] = created["metadata"]["uid"]

        def one_running_one_pending() -> tuple[str, str] | None:
            jobs = {n: _get_pytorchjob(api, namespace, n) for n in uids}
            running = [n for n, job in jobs.items() if not _suspended(job)]
            waiting = [n for n in uids if n not in running]
            if len(running) == 1 and _pending_workload(api, namespace, uids[waiting[0]]):
                return running[0], waiting[0]
            return None

        outcome = wait_for(
            one_running_one_pending, ADMIT_TIMEOUT, "Kueue to admit exactly one PyTorchJob"
        )
        assert outcome is not None
        admitted, waiting = outcome
        assert _admitted_workload(api, namespace, uids[admitted]) is not None
        pending = _pending_workload(api, namespace, uids[waiting])
        assert pending is not None
        assert (condition(pending, "Admitted") or {}).get("status") != "True"
        assert _suspended(_get_pytorchjob(api, namespace, waiting))

        # The Training Operator's part: the admitted job's pods ran to completion.
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        _custom(api).patch_namespaced_custom_object_status(
            "kubeflow.org",
            "v1",
            namespace,
            "pytorchjobs",
            admitted,
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Succeeded",
                            "status": "True",
                            "reason": "PyTorchJobSucceeded",
                            "message": "played by the test",
                            "lastUpdateTime": now,
                            "lastTransitionTime": now,
                        }
                    ],
                    "replicaStatuses": {"Master": {"succeeded": 1}},
                }
            },
        )

        wait_for(
            lambda: not _suspended(_get_pytorchjob(api, namespace, waiting)),
            ADMIT_TIMEOUT,
            f"Kueue to admit {waiting} once {admitted} finished",
        )
        assert _admitted_workload(api, namespace, uids[waiting]) is not None
        finished = workloads_of(api, namespace, uids[admitted])
        assert finished and (condition(finished[0], "Finished") or {}).get("status") == "True"


def test_suspended_batch_job_with_queue_label_is_admitted(
    kube_cluster: ControlPlane, one_job_queue: Queue
) -> None:
    namespace = one_job_queue.namespace
    job = client.V1Job(
        metadata=client.V1ObjectMeta(name="batch", labels=one_job_queue.labels),
        spec=client.V1JobSpec(
            suspend=True,
            template=client.V1PodTemplateSpec(
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[
                        client.V1Container(
                            name="main",
                            image="ulmfit-test/none:0",
                            resources=client.V1ResourceRequirements(requests=JOB_REQUESTS),
                        )
                    ],
                )
            ),
        ),
    )
    with kube_cluster.api_client() as api:
        batch: Any = client.BatchV1Api(api)
        uid = batch.create_namespaced_job(namespace, job).metadata.uid
        wait_for(
            lambda: batch.read_namespaced_job("batch", namespace).spec.suspend is False,
            ADMIT_TIMEOUT,
            "Kueue to unsuspend the Job",
        )
        workload = _admitted_workload(api, namespace, uid)
        assert workload is not None
        assert workload["status"]["admission"]["clusterQueue"] == one_job_queue.cluster_queue
