"""The control-plane harness runs a real kube-apiserver on real etcd.

Each test exercises behaviour only the real server has: storage round trips, CRD
establishment, CEL admission, RBAC and TokenRequest, and persistence across a restart.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.harness.kube import ControlPlane, least_privilege_kubeconfig
from tests.harness.ports import wait_for

pytestmark = pytest.mark.timeout(120)

GROUP = "realparts.ulmfit.test"
CEL_MESSAGE = "minReplicas must not exceed maxReplicas"


def _widget_crd(plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["minReplicas", "maxReplicas"],
                                    "properties": {
                                        "minReplicas": {"type": "integer", "minimum": 0},
                                        "maxReplicas": {"type": "integer"},
                                        "colour": {"type": "string", "default": "blue"},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.minReplicas <= self.maxReplicas",
                                            "message": CEL_MESSAGE,
                                        }
                                    ],
                                },
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def widgets(kube_cluster: ControlPlane) -> Iterator[str]:
    """An established CRD (unique plural per run); yields its plural."""
    from kubernetes.dynamic import DynamicClient

    plural = f"widgets{secrets.token_hex(2)}"
    name = f"{plural}.{GROUP}"
    with kube_cluster.api_client() as api:
        DynamicClient(api).resources.get(
            api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition"
        ).create(body=_widget_crd(plural))
        extensions = client.ApiextensionsV1Api(api)

        def established() -> bool:
            conditions = extensions.read_custom_resource_definition(name).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        wait_for(established, 30, f"CRD {name} to be Established")
    yield plural
    with kube_cluster.api_client() as api:
        client.ApiextensionsV1Api(api).delete_custom_resource_definition(name)


def _widget(name: str, min_replicas: int, max_replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"minReplicas": min_replicas, "maxReplicas": max_replicas},
    }


def test_namespace_and_configmap_round_trip(
    kube_cluster: ControlPlane, kube_namespace: str
) -> None:
    with kube_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        namespace = core.read_namespace(kube_namespace)
        assert namespace.status.phase == "Active"
        assert namespace.metadata.uid  # assigned by the server, not by us

        core.create_namespaced_config_map(
            kube_namespace,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="settings"),
                data={"learning-rate": "0.01", "phases": "head,all"},
            ),
        )
        read = core.read_namespaced_config_map("settings", kube_namespace)
        assert read.data == {"learning-rate": "0.01", "phases": "head,all"}
        assert int(read.metadata.resource_version) > 0
        names = [cm.metadata.name for cm in core.list_namespaced_config_map(kube_namespace).items]
        assert "settings" in names


def test_crd_custom_object_round_trip(
    kube_cluster: ControlPlane, kube_namespace: str, widgets: str
) -> None:
    with kube_cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object(
            GROUP, "v1", kube_namespace, widgets, _widget("small", 1, 3)
        )
        read = custom.get_namespaced_custom_object(GROUP, "v1", kube_namespace, widgets, "small")
    assert read["spec"]["minReplicas"] == 1
    assert read["spec"]["maxReplicas"] == 3
    assert read["spec"]["colour"] == "blue"  # the structural schema's default, applied on write


def test_cel_rule_rejects_a_bad_object_with_its_message(
    kube_cluster: ControlPlane, kube_namespace: str, widgets: str
) -> None:
    with kube_cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        with pytest.raises(ApiException) as rejected:
            custom.create_namespaced_custom_object(
                GROUP, "v1", kube_namespace, widgets, _widget("inverted", 5, 2)
            )
        # The rule is not simply rejecting everything: the boundary case passes.
        custom.create_namespaced_custom_object(
            GROUP, "v1", kube_namespace, widgets, _widget("equal", 2, 2)
        )
    assert rejected.value.status == 422
    assert CEL_MESSAGE in str(rejected.value.body)
    assert "spec" in str(rejected.value.body)  # the error names the field the rule sits on


def _configmap_reader(namespace: str) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "configmap-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reader-reads-configmaps"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "configmap-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    ]


def test_least_privilege_kubeconfig_grants_only_what_rbac_says(
    kube_cluster: ControlPlane, kube_namespace: str
) -> None:
    kubeconfig = least_privilege_kubeconfig(
        kube_cluster, _configmap_reader(kube_namespace), kube_namespace, "reader"
    )
    with kube_cluster.api_client(kubeconfig) as api:
        core = client.CoreV1Api(api)
        assert core.list_namespaced_config_map(kube_namespace).items is not None  # granted

        forbidden = [
            lambda: core.list_namespaced_secret(kube_namespace),  # another resource
            lambda: core.list_namespaced_config_map("default"),  # another namespace
            lambda: core.create_namespaced_config_map(  # a verb the role lacks
                kube_namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="nope"))
            ),
        ]
        for call in forbidden:
            with pytest.raises(ApiException) as denied:
                call()
            assert denied.value.status == 403
            assert f"system:serviceaccount:{kube_namespace}:reader" in str(denied.value.body)


@pytest.mark.timeout(180)
def test_restart_keeps_data_in_etcd(
    kube_cluster: ControlPlane, kube_namespace: str, widgets: str
) -> None:
    with kube_cluster.api_client() as api:
        created = client.CoreV1Api(api).create_namespaced_config_map(
            kube_namespace,
            client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="survivor"), data={"written": "before"}
            ),
        )
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, "v1", kube_namespace, widgets, _widget("survivor", 0, 4)
        )
    assert kube_cluster.apiserver is not None
    pid_before = kube_cluster.apiserver.pid
    kube_cluster.restart()
    assert kube_cluster.apiserver.pid != pid_before  # really a new process
    with kube_cluster.api_client() as api:
        read = client.CoreV1Api(api).read_namespaced_config_map("survivor", kube_namespace)
        widget = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, "v1", kube_namespace, widgets, "survivor"
        )
    assert read.data == {"written": "before"}
    assert read.metadata.uid == created.metadata.uid
    assert read.metadata.resource_version == created.metadata.resource_version
    assert widget["spec"]["maxReplicas"] == 4
