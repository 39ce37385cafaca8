"""`ulmfit logs` reads real pods' logs on the one-node test cluster (tests.harness.cluster).

No operator runs: the test writes, through the status subresource, the status the operator
would write while a job's classifier runs its second attempt, and starts the pods that attempt
(and an earlier one) would have, with the labels the operator's workloads carry. Only the
current attempt's pods are read, each line prefixed with its pod's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from typer.testing import CliRunner
from ulmfit_operator.children import LABEL_ATTEMPT, LABEL_JOB, LABEL_STAGE
from ulmfit_operator.cli import app
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.runtime.kube import Kube, job_ref

from tests.harness.kube import apply_manifests, load_manifests
from tests.harness.ports import wait_for
from tests.integration.test_cluster_node import python_pod
from tests.integration.test_terminal import SPEC, operator_status

pytestmark = pytest.mark.timeout(600)

CRD = Path(__file__).resolve().parents[2] / "manifests" / "crd" / "ulmfit.io_ulmfitjobs.yaml"
JOBS = "/apis/ulmfit.io/v1alpha1"


def _install_crd(kube: Kube, api: Any) -> None:
    """Our CRD, unless the chart installed it already (then it is left as the chart made it)."""
    try:
        kube.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"
                            "ulmfitjobs.ulmfit.io")  # fmt: skip
    except ApiException as error:
        if error.status != 404:
            raise
        apply_manifests(api, load_manifests([CRD]))
    wait_for(
        lambda: kube.request("GET", f"{JOBS}/ulmfitjobs", query=[("limit", "1")]) is not None,
        60,
        "the ULMFiTJob CRD to be served",
    )


def _script(pod: str) -> str:
    return f"for i in range(3):\n    print('{pod} line', i, flush=True)\n"


def test_logs_show_the_current_attempts_pods_prefixed(
    node_cluster: Any, node_namespace: str
) -> None:
    from kubernetes import client

    ns, job = node_namespace, "topics"
    current = ["topics-classifier-2-master-0", "topics-classifier-2-worker-0"]
    earlier = "topics-classifier-1-master-0"
    with node_cluster.api_client() as api:
        kube = Kube(api, OperatorMetrics())
        _install_crd(kube, api)
        body = {"apiVersion": "ulmfit.io/v1alpha1", "kind": "ULMFiTJob",
                "metadata": {"name": job, "namespace": ns}, "spec": SPEC}  # fmt: skip
        kube.request("POST", f"{JOBS}/namespaces/{ns}/ulmfitjobs", body)
        kube.merge_patch(job_ref(ns, job), {"status": operator_status(job)}, sub="status")

        core = client.CoreV1Api(api)
        for name, attempt in [(current[0], 2), (current[1], 2), (earlier, 1)]:
            labels = {LABEL_JOB: job, LABEL_STAGE: "classifier", LABEL_ATTEMPT: str(attempt)}
            core.create_namespaced_pod(ns, python_pod(node_cluster, name, _script(name), labels))

        def finished() -> bool:
            phases = {p.status.phase for p in core.list_namespaced_pod(ns).items}
            return phases == {"Succeeded"}

        wait_for(finished, 300, "the pods to finish", interval=1)

    kubeconfig = str(node_cluster.kubeconfig)
    result = CliRunner().invoke(app, ["logs", job, "-n", ns, "--kubeconfig", kubeconfig])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"[{pod}] {pod} line {i}" for pod in current for i in range(3)
    ]
    # --all-pods reads the earlier attempt too; -f ends when the finished pods' streams do.
    every = CliRunner().invoke(
        app, ["logs", job, "--all-pods", "-f", "-n", ns, "--kubeconfig", kubeconfig]
    )
    assert every.exit_code == 0, every.output
    assert f"[{earlier}] {earlier} line 2" in every.stdout.splitlines()
    assert sorted(every.stdout.splitlines()) == sorted(
        f"[{pod}] {pod} line {i}" for pod in [*current, earlier] for i in range(3)
    )
