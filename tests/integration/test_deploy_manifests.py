"""`manifests/` and `examples/`: hardened as promised, and accepted by the real API server.

Every ULMFiTJob in `examples/` is validated by `api.py` (what `ulmfit validate` does) and
server-side applied once the CRD is installed; the other example objects are applied too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from ulmfit_operator.api import KIND, load_job_file

from tests.harness.kube import ControlPlane
from tests.harness.tools import Tool

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
FIELD_MANAGER = "ulmfit-deploy-tests"
# Files deliberately left out of manifests/kustomization.yaml (each says why in its header).
NOT_IN_KUSTOMIZATION = {
    "kustomization.yaml",
    "rbac/role_namespaced.yaml",
    "operator/s3-credentials-secret.example.yaml",
    # Needs Kubeflow Trainer v2's CRDs: applied where Trainer is installed, not with the rest.
    "trainer/cluster-training-runtime.yaml",
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def apply(kubectl: Tool, cluster: ControlPlane, *args: str, text: str | None = None) -> list[str]:
    result = kubectl.run(
        "apply",
        "--server-side",
        f"--field-manager={FIELD_MANAGER}",
        "--force-conflicts",
        *args,
        input=text,
        kubeconfig=cluster.kubeconfig,
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def crd(kubectl: Tool, kube_cluster: ControlPlane) -> None:
    apply(kubectl, kube_cluster, "-f", str(MANIFESTS / "crd"))
    kubectl.run(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/ulmfitjobs.ulmfit.io",
        kubeconfig=kube_cluster.kubeconfig,
    )


# --- manifests/ ------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"])
    present = {str(p.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("*.yaml")}
    assert listed <= present, f"listed but missing: {sorted(listed - present)}"
    assert present - listed == NOT_IN_KUSTOMIZATION


def test_operator_deployment_is_hardened() -> None:
    (deployment,) = documents(MANIFESTS / "operator" / "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["automountServiceAccountToken"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"--health-port={ports['health']}" in container["args"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "health"
    env = {e["name"]: e["valueFrom"] for e in container["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["secretKeyRef"]["key"] == key
    (account,) = documents(MANIFESTS / "rbac" / "service_account.yaml")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False
    # The example Secret is the one the Deployment reads.
    (secret,) = documents(MANIFESTS / "operator" / "s3-credentials-secret.example.yaml")
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    (service,) = documents(MANIFESTS / "operator" / "service.yaml")
    assert service["spec"]["type"] == "ClusterIP"
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_api_server_accepts_the_kustomization(kubectl: Tool, kube_cluster: ControlPlane) -> None:
    built = kubectl.run("kustomize", str(MANIFESTS)).stdout
    expected = len([doc for doc in yaml.safe_load_all(built) if doc])
    applied = apply(kubectl, kube_cluster, "-k", str(MANIFESTS))
    assert len(applied) == expected and all("serverside-applied" in line for line in applied), (
        applied
    )
    stored = json.loads(
        kubectl.run(
            "get",
            "deployment",
            "ulmfit-operator",
            "-n",
            "ulmfit-system",
            "-o",
            "json",
            kubeconfig=kube_cluster.kubeconfig,
        ).stdout
    )
    assert stored["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_api_server_accepts_the_left_out_manifests(
    kubectl: Tool, kube_cluster: ControlPlane, kube_namespace: str
) -> None:
    applied = apply(
        kubectl,
        kube_cluster,
        "-n",
        kube_namespace,
        "-f",
        str(MANIFESTS / "rbac" / "role_namespaced.yaml"),
    )
    assert len(applied) == 2
    # The example Secret is accepted (dry run: it must never replace a real one).
    applied = apply(
        kubectl,
        kube_cluster,
        "--dry-run=server",
        "-f",
        str(MANIFESTS / "operator" / "s3-credentials-secret.example.yaml"),
    )
    assert applied == ["secret/ulmfit-operator-s3 serverside-applied (server dry run)"]


# --- examples/ -------------------------------------------------------------------------------


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {
        "ulmfitjob.yaml",
        "ulmfitjob-gpu.yaml",
        "ulmfitjob-s3.yaml",
        "s3-credentials-secret.yaml",
    } <= names


@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_api_server_accepts_every_example(
    kubectl: Tool, kube_cluster: ControlPlane, kube_namespace: str, example: Path
) -> None:
    docs = documents(example)
    if any(doc.get("kind") == KIND for doc in docs):
        load_job_file(example.read_text())  # raises InvalidSpec naming the field
    # A server-side dry run: admission, schema, CEL rules and defaulting all run, nothing is
    # stored (a stored job would be picked up by a later test's cluster-wide operator).
    result = kubectl.run(
        "apply",
        "--server-side",
        f"--field-manager={FIELD_MANAGER}",
        "--dry-run=server",
        "-n",
        kube_namespace,
        "-f",
        str(example),
        "-o",
        "json",
        kubeconfig=kube_cluster.kubeconfig,
    )
    answer = json.loads(result.stdout)
    returned = answer["items"] if answer.get("kind") == "List" else [answer]
    assert [obj["kind"] for obj in returned] == [doc["kind"] for doc in docs]
    for doc, obj in zip(docs, returned, strict=True):
        if doc["kind"] == KIND:
            # The server kept every field the example sets (none pruned as unknown).
            assert _subset(doc["spec"], obj["spec"]), f"{example.name}: the server dropped fields"
        else:
            assert obj["metadata"]["name"] == doc["metadata"]["name"]


def _subset(wanted: Any, got: Any) -> bool:
    if isinstance(wanted, dict):
        return isinstance(got, dict) and all(
            k in got and _subset(v, got[k]) for k, v in wanted.items()
        )
    if isinstance(wanted, list):  # items of a list get their defaults filled in as well
        return (
            isinstance(got, list)
            and len(wanted) == len(got)
            and all(_subset(w, g) for w, g in zip(wanted, got, strict=True))
        )
    if isinstance(wanted, float | int) and isinstance(got, float | int):
        return float(wanted) == float(got)
    return bool(wanted == got)
