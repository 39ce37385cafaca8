"""`resources.podTemplate` and `runPolicy.schedulingPolicy` at admission, on the real API server.

The generated CRD (manifests/crd) is applied to a real kube-apiserver; each ULMFiTJob below is
created as a server-side dry run (admission, structural schema, CEL rules and defaulting all run,
nothing is stored). A good spec keeps every field; each bad one is refused with HTTP 422 and a
message that names the field and the value, as `api.parse_spec` would.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from ulmfit_operator.api import parse_spec
from ulmfit_trainer.errors import InvalidSpec

from tests.harness.kube import ControlPlane
from tests.harness.ports import wait_for
from tests.harness.tools import Tool
from tests.unit.test_api_overrides import FULL

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "manifests" / "crd"
FIELD_MANAGER = "ulmfit-crd-overrides-tests"
STORAGE = {"s3": {"endpoint": "http://minio:9000", "bucket": "ulmfit"}}


@pytest.fixture(scope="module")
def crd(kubectl: Tool, kube_cluster: ControlPlane) -> None:
    kubectl.run(
        "apply",
        "--server-side",
        f"--field-manager={FIELD_MANAGER}",
        "--force-conflicts",
        "-f",
        str(CRD_DIR),
        kubeconfig=kube_cluster.kubeconfig,
    )
    # `kubectl wait` fails outright when the CRD has no conditions yet: poll instead.
    def established() -> bool:
        with kube_cluster.api_client() as api:
            found = client.ApiextensionsV1Api(api).read_custom_resource_definition(
                "ulmfitjobs.ulmfit.io"
            )
        conditions = (found.status.conditions if found.status else None) or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for(established, 60, "the ULMFiTJob CRD to be established")


def job(namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "ulmfit.io/v1alpha1",
        "kind": "ULMFiTJob",
        "metadata": {"name": "overrides", "namespace": namespace},
        "spec": spec,
    }


def dry_run(cluster: ControlPlane, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    with cluster.api_client() as api:
        return client.CustomObjectsApi(api).create_namespaced_custom_object(
            "ulmfit.io", "v1alpha1", namespace, "ulmfitjobs", job(namespace, spec), dry_run="All"
        )


def with_pod(pod: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"storage": STORAGE, "resources": {"podTemplate": pod}, **extra}


def _subset(wanted: Any, got: Any) -> bool:
    if isinstance(wanted, dict):
        return isinstance(got, dict) and all(
            key in got and _subset(value, got[key]) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(got, list)
            and len(wanted) == len(got)
            and all(_subset(w, g) for w, g in zip(wanted, got, strict=True))
        )
    return bool(wanted == got)


@pytest.mark.usefixtures("crd")
def test_api_server_keeps_a_full_pod_template_and_gang_policy(
    kube_cluster: ControlPlane, kube_namespace: str
) -> None:
    gang = {"minAvailable": 2, "queue": "research", "priorityClass": "high"}
    spec = with_pod(FULL, runPolicy={"schedulingPolicy": gang})
    spec["resources"]["workers"] = 2
    parse_spec(spec)  # the models agree
    stored = dry_run(kube_cluster, kube_namespace, copy.deepcopy(spec))
    assert _subset(spec["resources"]["podTemplate"], stored["spec"]["resources"]["podTemplate"])
    assert _subset(gang, stored["spec"]["runPolicy"]["schedulingPolicy"])
    # The server's defaults are the models' (lists filled in, operator Equal).
    tolerations = stored["spec"]["resources"]["podTemplate"]["tolerations"]
    assert tolerations[1]["operator"] == "Equal"
    assert parse_spec(stored["spec"]) == parse_spec(spec)


REFUSED: list[tuple[str, dict[str, Any], list[str]]] = [
    ("operator-label", with_pod({"labels": {"ulmfit.io/job": "x"}}), ["ulmfit.io/job", "operator"]),
    ("bad-label-key", with_pod({"labels": {"bad key": "x"}}), ["labels", "bad key"]),
    ("bad-label-value", with_pod({"labels": {"team": "no spaces"}}), ["labels", "no spaces"]),
    (
        "bad-annotation-key",
        with_pod({"annotations": {"-x": "y"}}),
        ["annotations: key '-x' is not a valid key"],
    ),
    (
        "toleration-effect",
        with_pod({"tolerations": [{"key": "a", "effect": "Sometimes"}]}),
        ["tolerations[0].effect", "Sometimes"],
    ),
    (
        "toleration-exists-value",
        with_pod({"tolerations": [{"key": "a", "operator": "Exists", "value": "v"}]}),
        ["value 'v' must be empty when operator is Exists"],
    ),
    (
        "toleration-seconds",
        with_pod({"tolerations": [{"key": "a", "tolerationSeconds": 5}]}),
        ["tolerationSeconds 5 needs effect NoExecute (got None)"],
    ),
    (
        "host-path",
        with_pod({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}),
        # The server prunes the unknown hostPath (or refuses it with fieldValidation=Strict);
        # what is left has no source.
        ["volumes[0]", "volume 'h': give exactly one of persistentVolumeClaim"],
    ),
    (
        "operator-volume",
        with_pod({"volumes": [{"name": "dshm", "emptyDir": {"sizeLimit": "1Gi"}}]}),
        ["volumes[0].name", "name 'dshm' is the operator's own volume"],
    ),
    (
        "two-sources",
        with_pod(
            {
                "volumes": [
                    {"name": "v", "emptyDir": {"sizeLimit": "1Gi"}, "secret": {"secretName": "s"}}
                ]
            }
        ),
        ["volume 'v': give exactly one of persistentVolumeClaim"],
    ),
    (
        "duplicate-volume",
        with_pod({"volumes": [{"name": "v", "emptyDir": {"sizeLimit": "1Gi"}}] * 2}),
        ["volumes: name 'v' appears more than once"],
    ),
    (
        "undeclared-mount",
        with_pod({"volumeMounts": [{"name": "nope", "mountPath": "/data"}]}),
        ["volumeMounts: 'nope' (at /data) is not a volume of podTemplate.volumes"],
    ),
    (
        "shadowing-mount",
        with_pod(
            {
                "volumes": [{"name": "v", "emptyDir": {"sizeLimit": "1Gi"}}],
                "volumeMounts": [{"name": "v", "mountPath": "/dev"}],
            }
        ),
        ["mountPath '/dev' would hide the operator's mount /dev/shm"],
    ),
    (
        "mount-in-dev",
        with_pod(
            {
                "volumes": [{"name": "v", "emptyDir": {"sizeLimit": "1Gi"}}],
                "volumeMounts": [{"name": "v", "mountPath": "/dev/nvidia0"}],
            }
        ),
        ["mountPath '/dev/nvidia0' is inside /dev, where nothing may be mounted"],
    ),
    (
        "dotdot-mount",
        with_pod(
            {
                "volumes": [{"name": "v", "emptyDir": {"sizeLimit": "1Gi"}}],
                "volumeMounts": [{"name": "v", "mountPath": "/data/../etc"}],
            }
        ),
        ["volumeMounts[0].mountPath", "/data/../etc"],
    ),
    (
        "operator-env",
        with_pod({"env": [{"name": "HOME", "value": "/root"}]}),
        ["env[0].name", "name 'HOME' is set by the operator"],
    ),
    (
        "pet-env",
        with_pod({"env": [{"name": "PET_NNODES", "value": "9"}]}),
        ["name 'PET_NNODES' is set by the operator"],
    ),
    (
        "credential-env",
        with_pod({"env": [{"name": "AWS_ACCESS_KEY_ID", "value": "leak"}]}),
        ["name 'AWS_ACCESS_KEY_ID' is the S3 credential variable of storage.s3"],
    ),
    (
        "duplicate-env",
        with_pod({"env": [{"name": "A", "value": "x"}, {"name": "A", "value": "y"}]}),
        ["env: name 'A' appears more than once"],
    ),
    (
        "env-two-values",
        with_pod(
            {
                "env": [
                    {
                        "name": "A",
                        "value": "x",
                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                    }
                ]
            }
        ),
        ["variable 'A': give value or valueFrom, not both"],
    ),
    (
        "env-from-none",
        with_pod({"envFrom": [{"prefix": "X_"}]}),
        ["give exactly one of secretRef, configMapRef"],
    ),
    (
        "node-requirement",
        with_pod(
            {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "m", "operator": "Gt"}]}
                            ]
                        }
                    }
                }
            }
        ),
        ["operator Gt needs exactly one integer value"],
    ),
    (
        "pod-requirement",
        with_pod(
            {
                "affinity": {
                    "podAntiAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "labelSelector": {
                                    "matchExpressions": [
                                        {"key": "a", "operator": "Exists", "values": ["x"]}
                                    ]
                                },
                                "topologyKey": "kubernetes.io/hostname",
                            }
                        ]
                    }
                }
            }
        ),
        ["operator Exists takes no values (got 1)"],
    ),
    (
        "priority-class",
        with_pod({"priorityClassName": "High_Priority"}),
        ["priorityClassName", "High_Priority"],
    ),
    (
        "gang-too-big",
        {"storage": STORAGE, "runPolicy": {"schedulingPolicy": {"minAvailable": 3}}},
        ["runPolicy.schedulingPolicy.minAvailable 3 exceeds resources.workers 1"],
    ),
    (
        "gang-zero",
        {"storage": STORAGE, "runPolicy": {"schedulingPolicy": {"minAvailable": 0}}},
        ["schedulingPolicy.minAvailable", "should be greater than or equal to 1"],
    ),
]


@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize(
    ("spec", "needles"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED]
)
def test_api_server_refuses_a_bad_override_naming_field_and_value(
    kube_cluster: ControlPlane, kube_namespace: str, spec: dict[str, Any], needles: list[str]
) -> None:
    with pytest.raises(InvalidSpec):  # the models refuse it too
        parse_spec(spec)
    with pytest.raises(ApiException) as refused:
        dry_run(kube_cluster, kube_namespace, copy.deepcopy(spec))
    assert refused.value.status == 422, refused.value.body
    body = str(refused.value.body).replace('\\"', '"')
    for needle in needles:
        assert needle in body, (needle, body)


def test_children_with_overrides_and_a_gang_policy_pass_their_own_schemas_unpruned(
    kube_cluster: ControlPlane, kube_namespace: str
) -> None:
    """The children as the operator renders them (every pod with the full podTemplate, the
    PyTorchJob with its schedulingPolicy) are dry-run created against the real Training Operator
    PyTorchJob CRD, the real KubeRay RayJob CRD and the built-in Job: each is admitted, and what
    the server would store still holds every field sent (a structural schema prunes what it does
    not know, silently)."""
    from ulmfit_operator.metrics import OperatorMetrics
    from ulmfit_operator.runtime.kube import Kube

    from tests.harness.crds import pytorchjob_crd, ray_crds
    from tests.harness.kube import load_manifests
    from tests.harness.kueue import install_crds
    from tests.unit.test_workloads_overrides import OWNER, children

    with kube_cluster.api_client() as api:
        install_crds(api, load_manifests([pytorchjob_crd(), *ray_crds()]))
        kube = Kube(api, OperatorMetrics())
        owner = type(OWNER)(OWNER.name, kube_namespace, OWNER.uid)
        gang = {"minAvailable": 2, "queue": "gang", "priorityClass": "high"}
        bodies = children(
            {
                "resources": {"workers": 2, "podTemplate": FULL},
                "runPolicy": {"schedulingPolicy": gang},
            },
            owner,
        )
        plural = {"PyTorchJob": "pytorchjobs", "RayJob": "rayjobs", "Job": "jobs"}
        for body in bodies:
            sent = copy.deepcopy(body)
            # The owner is made up here: a dry run still checks the reference's shape.
            group, _, version = body["apiVersion"].rpartition("/")
            path = (
                f"/apis/{group}/{version}/namespaces/{kube_namespace}/{plural[body['kind']]}"
            )
            stored = kube.request("POST", path, body, query=[("dryRun", "All")])
            assert _subset(sent["spec"], stored["spec"]), (body["kind"], body["metadata"]["name"])
            if body["kind"] == "PyTorchJob":
                assert stored["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] == 2
