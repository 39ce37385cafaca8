"""The kubectl and helm the tests use are the real binaries, talking to the real API server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.harness.kube import ControlPlane, least_privilege_kubeconfig
from tests.harness.tools import Tool, ToolError

pytestmark = pytest.mark.timeout(120)

CHART_YAML = """\
apiVersion: v2
name: throwaway
description: A chart written by the real-parts tests
type: application
version: 0.1.0
appVersion: "1.0"
"""

VALUES_YAML = """\
greeting: hello
replicas: 2
"""

CONFIGMAP_TEMPLATE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-settings
  labels:
    app.kubernetes.io/name: {{ .Chart.Name }}
    app.kubernetes.io/instance: {{ .Release.Name }}
data:
  greeting: {{ .Values.greeting | quote }}
  replicas: {{ .Values.replicas | quote }}
"""


@pytest.fixture
def chart(tmp_path: Path) -> Path:
    root = tmp_path / "throwaway"
    (root / "templates").mkdir(parents=True)
    (root / "Chart.yaml").write_text(CHART_YAML)
    (root / "values.yaml").write_text(VALUES_YAML)
    (root / "templates" / "configmap.yaml").write_text(CONFIGMAP_TEMPLATE)
    return root


def test_kubectl_lists_namespaces(
    kubectl: Tool, kube_cluster: ControlPlane, kube_namespace: str
) -> None:
    result = kubectl.run("get", "ns", "-o", "name", kubeconfig=kube_cluster.kubeconfig)
    names = result.stdout.split()
    assert f"namespace/{kube_namespace}" in names
    assert "namespace/kube-system" in names  # created by the API server itself


def test_kubectl_reports_the_pinned_server_version(
    kubectl: Tool, kube_cluster: ControlPlane
) -> None:
    result = kubectl.run("version", "-o", "json", kubeconfig=kube_cluster.kubeconfig)
    server = json.loads(result.stdout)["serverVersion"]
    assert server["gitVersion"] == kube_cluster.kubernetes_version
    major, minor = kube_cluster.kubernetes_version.lstrip("v").split(".")[:2]
    assert (server["major"], server["minor"]) == (major, minor)


def test_kubectl_with_least_privilege_is_denied(
    kubectl: Tool, kube_cluster: ControlPlane, kube_namespace: str
) -> None:
    kubeconfig = least_privilege_kubeconfig(
        kube_cluster,
        [{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}}],
        kube_namespace,
        "nobody",
    )
    who = kubectl.run("auth", "whoami", "-o", "json", kubeconfig=kubeconfig)
    username = json.loads(who.stdout)["status"]["userInfo"]["username"]
    assert username == f"system:serviceaccount:{kube_namespace}:nobody"
    denied = kubectl.run("get", "configmaps", kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()


def test_helm_is_version_4(helm: Tool) -> None:
    result = helm.run("version", "--template", "{{.Version}}")
    assert result.stdout.startswith("v4."), result.stdout


def test_helm_lints_and_templates_a_chart(helm: Tool, chart: Path) -> None:
    lint = helm.run("lint", str(chart))
    assert "0 chart(s) failed" in lint.stdout

    rendered = helm.run("template", "demo", str(chart), "--set", "greeting=hi there")
    objects = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [("ConfigMap", "demo-settings")]
    assert objects[0]["data"] == {"greeting": "hi there", "replicas": "2"}


def test_helm_lint_fails_on_a_broken_template(helm: Tool, chart: Path) -> None:
    (chart / "templates" / "broken.yaml").write_text("kind: {{ .Values.greeting\n")
    with pytest.raises(ToolError) as failed:
        helm.run("lint", str(chart))
    assert "broken.yaml" in str(failed.value)


def test_rendered_chart_applies_to_the_api_server(
    helm: Tool, kubectl: Tool, kube_cluster: ControlPlane, kube_namespace: str, chart: Path
) -> None:
    rendered = helm.run("template", "applied", str(chart), "--namespace", kube_namespace)
    kubectl.run(
        "apply",
        "--namespace",
        kube_namespace,
        "-f",
        "-",
        input=rendered.stdout,
        kubeconfig=kube_cluster.kubeconfig,
    )
    with kube_cluster.api_client() as api:
        read = client.CoreV1Api(api).read_namespaced_config_map("applied-settings", kube_namespace)
    assert read.data == {"greeting": "hello", "replicas": "2"}
    assert read.metadata.labels["app.kubernetes.io/instance"] == "applied"
