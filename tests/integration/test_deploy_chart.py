"""The Helm chart, with the real helm 4 and kubectl against the real API server.

Lint, render every documented setup (`ci/*-values.yaml`), refuse inconsistent values with the
chart's own message, keep one source of truth with `manifests/` (CRD byte for byte, RBAC rules
equal), and have the API server accept what the chart renders.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from ulmfit_operator.policy import JobPolicy
from ulmfit_operator.settings import OperatorSettings, flag

from tests.harness.kube import ControlPlane
from tests.harness.tools import Tool, ToolError

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ulmfit-operator"
MANIFESTS = ROOT / "manifests"
SETUPS = sorted(CHART.glob("ci/*-values.yaml"))
FIELD_MANAGER = "ulmfit-deploy-tests"

# A stand-in for the Prometheus Operator's CRD, so the API server can judge a ServiceMonitor.
SERVICEMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "listKind": "ServiceMonitorList",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
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


def render(
    helm: Tool, *args: str, release: str = "ulmfit", namespace: str = "ulmfit-system"
) -> list[dict[str, Any]]:
    result = helm.run("template", release, str(CHART), "--namespace", namespace, *args)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def setup_args(setup: Path) -> list[str]:
    return ["--values", str(setup)]


def find(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def manifest_rules(name: str, kind: str) -> list[dict[str, Any]]:
    documents = yaml.safe_load_all((MANIFESTS / "rbac" / name).read_text())
    (obj,) = [doc for doc in documents if doc and doc["kind"] == kind]
    return list(obj["rules"])


# --- lint and render -------------------------------------------------------------------------


def test_chart_metadata_matches_the_project() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "ulmfit-operator"
    assert chart["appVersion"] == project["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])


@pytest.mark.parametrize("setup", [None, *SETUPS], ids=lambda s: s.stem if s else "no-values")
def test_helm_lint_strict(helm: Tool, setup: Path | None) -> None:
    args = setup_args(setup) if setup else []
    result = helm.run("lint", "--strict", str(CHART), *args)
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: s.stem)
def test_every_setup_renders_a_hardened_operator(helm: Tool, setup: Path) -> None:
    values = yaml.safe_load(setup.read_text()) or {}
    objects = render(helm, *setup_args(setup))
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    # Hardening: the restricted Pod Security Standard and a read-only root with /tmp writable.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["tmp"] == "/tmp" and "emptyDir" in volumes["tmp"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["automountServiceAccountToken"] is True

    # Probes ask the health port; metrics go through a ClusterIP Service.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    args = container["args"]
    assert f"--health-port={ports['health']}" in args
    assert f"--metrics-port={ports['metrics']}" in args
    service = one(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )

    # Leader election unless standalone; standalone never overlaps two pods.
    standalone = values.get("standalone", False)
    assert ("--standalone" in args) == standalone
    if standalone:
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["spec"]["replicas"] == values.get("replicas", 1)

    # Namespace scope: the operator watches that namespace; nothing cluster-wide is created.
    scope = values.get("rbac", {}).get("scope", "cluster")
    namespaced_args = [a for a in args if a.startswith("--namespace=")]
    rbac_create = values.get("rbac", {}).get("create", True)
    if scope == "namespace":
        assert namespaced_args == [f"--namespace={values['watchNamespaces'][0]}"]
        assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding")
        assert {r["metadata"]["namespace"] for r in find(objects, "Role")} == set(
            values["watchNamespaces"]
        )
    else:
        assert namespaced_args == []
        assert len(find(objects, "ClusterRole")) == (1 if rbac_create else 0)
    if not rbac_create:
        assert not [o for o in objects if o["kind"].endswith(("Role", "RoleBinding"))]

    # S3 keys by secretKeyRef from the configured Secret, never inline.
    secret = values.get("s3", {}).get("credentialsSecret", {})
    env = {e["name"]: e for e in container["env"]}
    for variable, key_value, default_key in (
        ("AWS_ACCESS_KEY_ID", "accessKeyIdKey", "AWS_ACCESS_KEY_ID"),
        ("AWS_SECRET_ACCESS_KEY", "secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"),
    ):
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret.get("name", "ulmfit-operator-s3")
        assert ref["key"] == secret.get(key_value, default_key)
    assert not find(objects, "Secret")

    # The ServiceAccount exists only when created, and never automounts.
    accounts = find(objects, "ServiceAccount")
    if values.get("serviceAccount", {}).get("create", True):
        (account,) = accounts
        assert account["automountServiceAccountToken"] is False
        assert pod["serviceAccountName"] == account["metadata"]["name"]
    else:
        assert accounts == []
        assert pod["serviceAccountName"] == values["serviceAccount"]["name"]

    # Optional objects follow their switches.
    assert len(find(objects, "ServiceMonitor")) == int(
        values.get("serviceMonitor", {}).get("enabled", False)
    )
    assert len(find(objects, "PodDisruptionBudget")) == int(
        values.get("podDisruptionBudget", {}).get("enabled", False)
    )
    assert len(find(objects, "NetworkPolicy")) == int(
        values.get("networkPolicy", {}).get("enabled", True)
    )
    image = values.get("image", {})
    if image.get("digest"):
        assert container["image"] == f"{image['repository']}@{image['digest']}"

    # What jobs may name: the S3 endpoints (s3.endpoint by default) and the trainer images, in
    # the operator's flags and (images) in an admission policy bound where the operator watches.
    settings = settings_from(args)
    endpoint = values.get("s3", {}).get("endpoint")
    assert settings.allowed_s3_endpoints == ((endpoint,) if endpoint else ("*",))
    patterns = values.get("allowedTrainerImages", ["ghcr.io/ulmfit-operator/trainer"])
    assert settings.allowed_trainer_images == tuple(patterns)
    (policy,) = find(objects, "ValidatingAdmissionPolicy")
    (binding,) = find(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    if scope == "namespace":
        assert binding["spec"]["matchResources"]["namespaceSelector"] == {
            "matchLabels": {"kubernetes.io/metadata.name": values["watchNamespaces"][0]}
        }
    else:
        assert "matchResources" not in binding["spec"]


def test_default_image_is_the_app_version(helm: Tool) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (container,) = one(render(helm), "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/ulmfit-operator/operator:{chart['appVersion']}"


BAD_VALUES = [
    (
        ["--set", "replicas=2", "--set", "standalone=true"],
        "replicas is 2 but standalone is true",
    ),
    (["--set", "rbac.scope=namespace"], "rbac.scope is namespace but watchNamespaces is empty"),
    (
        ["--set", "rbac.scope=namespace", "--set", "watchNamespaces={a,b}"],
        "watchNamespaces has 2 entries (a, b)",
    ),
    (["--set", "watchNamespaces={a}"], "watchNamespaces is set (a) but rbac.scope is cluster"),
    (
        ["--set", "s3.endpoint=minio:9000", "--set", "s3.credentialsSecret.name="],
        's3.endpoint is "minio:9000" but s3.credentialsSecret.name is empty',
    ),
    (["--set", "podDisruptionBudget.enabled=true"], "podDisruptionBudget.enabled with replicas 1"),
    (
        [
            "--set",
            "podDisruptionBudget.enabled=true",
            "--set",
            "replicas=2",
            "--set",
            "podDisruptionBudget.minAvailable=2",
        ],
        "podDisruptionBudget.minAvailable 2 is not below replicas 2",
    ),
    (
        ["--set", "metricsPort=9000", "--set", "healthPort=9000"],
        "metricsPort and healthPort are both 9000",
    ),
    (
        ["--set", "rbac.create=false", "--set", "serviceAccount.create=false"],
        "serviceAccount.create and rbac.create are false but serviceAccount.name is empty",
    ),
    (["--set", "resyncSeconds=0.0"], "resyncSeconds is 0.0"),
    (["--set", "leaseDuration=0.5"], "leaseDuration is 0.5"),
]


@pytest.mark.parametrize(
    ("args", "message"), BAD_VALUES, ids=[m.split(":")[0][:40] for _, m in BAD_VALUES]
)
def test_inconsistent_values_fail_with_a_clear_message(
    helm: Tool, args: list[str], message: str
) -> None:
    result = helm.run("template", "ulmfit", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert "ulmfit-operator: invalid values:" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "bogus=1"], "additional properties 'bogus' not allowed"),
        (["--set", "rbac.scope=everywhere"], "rbac/scope"),
        (["--set", "replicas=0"], "replicas"),
        (["--set", "image.pullPolicy=Sometimes"], "image/pullPolicy"),
        (["--set", "serviceMonitor.interval=often"], "serviceMonitor/interval"),
        (["--set", "s3.credentialsSecret.typo=x"], "additional properties 'typo' not allowed"),
        (["--set-json", "allowedTrainerImages=[]"], "allowedTrainerImages"),
        (["--set", "allowedTrainerImages={registry/*/trainer}"], "allowedTrainerImages/0"),
        (["--set", "allowedTrainerImages={a b}"], "allowedTrainerImages/0"),
        (["--set", "allowedS3Endpoints={ftp://minio:21}"], "allowedS3Endpoints/0"),
        (["--set", "allowedS3Endpoints={http://minio:9000/bucket}"], "allowedS3Endpoints/0"),
        (["--set", "admissionPolicy.enabled=maybe"], "admissionPolicy/enabled"),
    ],
)
def test_schema_rejects_unknown_keys_and_wrong_types(
    helm: Tool, args: list[str], message: str
) -> None:
    result = helm.run("template", "ulmfit", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert "schema" in result.stderr and message in result.stderr, result.stderr


def test_every_value_is_documented() -> None:
    """Each leaf of values.yaml has a `# --` comment above it or above an enclosing map."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: dict[tuple[str, ...], bool] = {}
    stack: list[tuple[int, str]] = []
    comment_block: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not match:
            comment_block = [] if not stripped else comment_block
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*[name for _, name in stack], match.group(2))
        documented[path] = any(c.startswith("# --") for c in comment_block)
        stack.append((indent, match.group(2)))
        comment_block = []
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(node: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if isinstance(node, dict) and node:
            for key, child in node.items():
                yield from leaves(child, (*path, key))
        else:
            yield path

    undocumented = [
        ".".join(path)
        for path in leaves(values, ())
        if not any(documented.get(path[:i]) for i in range(1, len(path) + 1))
    ]
    assert undocumented == []


def test_schema_is_strict() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def check(node: dict[str, Any], value: Any, path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or 'values'} is not strict"
            assert set(value) <= set(node["properties"]), f"{path}: keys missing from the schema"
            for key, child in value.items():
                check(node["properties"][key], child, f"{path}.{key}".lstrip("."))

    check(schema, values, "")


# --- one source of truth ---------------------------------------------------------------------


def test_chart_copies_are_in_sync_with_manifests() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sync_chart.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert crds == sorted(p.name for p in (MANIFESTS / "crd").glob("*.yaml")) and crds
    for name in crds:
        assert (CHART / "crds" / name).read_bytes() == (MANIFESTS / "crd" / name).read_bytes()


def test_rendered_rbac_rules_equal_the_manifests(helm: Tool) -> None:
    cluster = render(helm)
    assert one(cluster, "ClusterRole")["rules"] == manifest_rules(
        "cluster_role.yaml", "ClusterRole"
    )
    (leader,) = [
        r for r in find(cluster, "Role") if r["metadata"]["name"].endswith("-leader-election")
    ]
    assert leader["rules"] == manifest_rules("leader_election_role.yaml", "Role")

    namespaced = render(helm, "--set", "rbac.scope=namespace", "--set", "watchNamespaces={ml-team}")
    role = one(namespaced, "Role")
    assert role["metadata"]["namespace"] == "ml-team"
    assert role["rules"] == manifest_rules("role_namespaced.yaml", "Role")

    # Bindings point at the roles and the chart's ServiceAccount, as the manifests' do.
    account = one(cluster, "ServiceAccount")["metadata"]
    for objects in (cluster, namespaced):
        for binding in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding"):
            (subject,) = binding["subjects"]
            assert (subject["kind"], subject["name"], subject["namespace"]) == (
                "ServiceAccount",
                account["name"],
                account["namespace"],
            )
            roles = {(o["kind"], o["metadata"]["name"]) for o in objects}
            assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in roles


def test_standalone_needs_no_lease(helm: Tool) -> None:
    objects = render(helm, "--set", "standalone=true")
    assert [r["metadata"]["name"] for r in find(objects, "Role")] == []


TRAINER_RUNTIME_API = "trainer.kubeflow.org/v1alpha1/ClusterTrainingRuntime"


def test_the_training_runtime_is_installed_where_trainer_is_served(helm: Tool) -> None:
    """The ClusterTrainingRuntime TrainJobs name: rendered where the API serves Trainer v2's
    runtimes (or when asked to be), never where it would fail the install; its spec is
    manifests/trainer/'s, under the name the operator is told (`trainingRuntime`)."""
    assert find(render(helm), "ClusterTrainingRuntime") == []
    assert find(render(helm, "--api-versions", TRAINER_RUNTIME_API,
                       "--set", "trainingRuntimeInstall=never"), "ClusterTrainingRuntime") == []
    served = render(
        helm, "--api-versions", TRAINER_RUNTIME_API, "--set", "trainingRuntime=team-torch"
    )
    runtime = one(served, "ClusterTrainingRuntime")
    (manifest,) = [d for d in yaml.safe_load_all(
        (MANIFESTS / "trainer" / "cluster-training-runtime.yaml").read_text()) if d]
    assert runtime["spec"] == manifest["spec"]
    assert runtime["metadata"]["name"] == "team-torch"
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert "--training-runtime=team-torch" in container_args(served)
    forced = render(helm, "--set", "trainingRuntimeInstall=always")
    assert one(forced, "ClusterTrainingRuntime")["metadata"]["name"] == "ulmfit-torch"


# --- the operator's settings (the rest is in tests/unit/test_settings.py) ---------------------


def container_args(objects: list[dict[str, Any]]) -> list[str]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


def settings_from(args: list[str]) -> OperatorSettings:
    """The settings the operator's command line makes of `args` (what the container runs)."""
    from ulmfit_operator.__main__ import app

    command = typer.main.get_command(app)
    with command.make_context("ulmfit-operator", list(args)) as context:
        return OperatorSettings(**context.params)


def test_chart_defaults_are_the_settings_defaults_and_the_manifests_args(helm: Tool) -> None:
    args = container_args(render(helm))
    assert settings_from(args) == OperatorSettings()
    (deployment,) = [
        d for d in yaml.safe_load_all((MANIFESTS / "operator" / "deployment.yaml").read_text()) if d
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == args


def test_every_settings_value_renders_to_its_flag(helm: Tool) -> None:
    values: dict[str, Any] = {
        "allowedS3Endpoints": ["https://s3.example.com", "minio.minio.svc:9000"],
        "allowedTrainerImages": ["registry.example.com/ml/trainer", "registry.example.com/x/*"],
        "metricsPort": 9100,
        "metricsAddress": "127.0.0.1",
        "healthPort": 9101,
        "healthAddress": "127.0.0.2",
        "workers": 3,
        "resyncSeconds": 2.5,
        "leaseName": "my-lease",
        "leaseNamespace": "leases",
        "leaseDuration": 6,
        "logFormat": "text",
        "logLevel": "DEBUG",
    }
    sets = [
        arg for key, value in values.items() for arg in ("--set-json", f"{key}={json.dumps(value)}")
    ]
    namespaced = ["--set", "rbac.scope=namespace", "--set", "watchNamespaces={ml-team}"]
    args = container_args(render(helm, *sets, *namespaced))
    assert settings_from(args) == OperatorSettings(
        namespace="ml-team",
        metrics_port=9100,
        metrics_address="127.0.0.1",
        health_port=9101,
        health_address="127.0.0.2",
        workers=3,
        resync_seconds=2.5,
        lease_name="my-lease",
        lease_namespace="leases",
        lease_duration=6,
        log_format="text",
        log_level="DEBUG",
        allowed_s3_endpoints=("https://s3.example.com", "minio.minio.svc:9000"),
        allowed_trainer_images=("registry.example.com/ml/trainer", "registry.example.com/x/*"),
    )
    # Every setting but the pod's own identity and the switch has been set by a value.
    assert {arg.split("=", 1)[0] for arg in args} == {
        flag(name)
        for name in OperatorSettings.model_fields
        if name not in {"identity", "standalone"}
    }
    standalone = render(helm, "--set", "standalone=true")
    assert settings_from(container_args(standalone)).standalone is True
    # A decimal given with --set reaches the operator as it is.
    assert (
        settings_from(container_args(render(helm, "--set", "resyncSeconds=0.5"))).resync_seconds
        == 0.5
    )


@pytest.mark.parametrize(
    ("args", "endpoints"),
    [
        ([], ("*",)),  # nothing configured: any endpoint (the operator logs a warning)
        (["--set", "s3.endpoint=http://minio.minio.svc:9000"], ("http://minio.minio.svc:9000",)),
        (
            [
                "--set",
                "s3.endpoint=http://minio.minio.svc:9000",
                "--set",
                "allowedS3Endpoints={https://s3.example.com,minio.minio.svc:9000}",
            ],
            ("https://s3.example.com", "minio.minio.svc:9000"),
        ),
        (["--set", "allowedS3Endpoints={*}"], ("*",)),
    ],
)
def test_the_s3_endpoints_default_to_the_configured_endpoint(
    helm: Tool, args: list[str], endpoints: tuple[str, ...]
) -> None:
    settings = settings_from(container_args(render(helm, *args)))
    assert settings.allowed_s3_endpoints == endpoints


def test_the_admission_policy_is_optional_and_matches_as_the_operator_does(helm: Tool) -> None:
    disabled = render(helm, "--set", "admissionPolicy.enabled=false")
    assert not [o for o in disabled if o["kind"].startswith("ValidatingAdmissionPolicy")]
    patterns = [
        "ghcr.io/ulmfit-operator/trainer",
        "registry.example.com/ml/*",
        "localhost:5000/t:dev",
    ]
    objects = render(helm, "--set-json", f"allowedTrainerImages={json.dumps(patterns)}")
    policy = one(objects, "ValidatingAdmissionPolicy")
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    [rule] = spec["matchConstraints"]["resourceRules"]
    assert (rule["apiGroups"], rule["resources"], rule["operations"]) == (
        ["ulmfit.io"],
        ["ulmfitjobs"],  # not ulmfitjobs/status: the operator's status writes pass
        ["CREATE", "UPDATE"],
    )
    [validation] = spec["validations"]
    regexes = re.findall(r'r"([^"]*)"', validation["expression"])
    assert len(regexes) == len(patterns)
    # The chart's regular expressions (Go's QuoteMeta, RE2) decide as the operator's do.
    operator = JobPolicy(trainer_images=tuple(patterns))
    digest = "sha256:" + "0123456789abcdef" * 4
    for image in [
        "ghcr.io/ulmfit-operator/trainer",
        "ghcr.io/ulmfit-operator/trainer:0.1.0",
        f"ghcr.io/ulmfit-operator/trainer@{digest}",
        f"ghcr.io/ulmfit-operator/trainer:1@{digest}",
        "ghcr.io/ulmfit-operator/trainer-evil:1",
        "ghcr.io/ulmfit-operator/trainer:a/b",
        "ghcrXio/ulmfit-operator/trainer",
        "registry.example.com/ml/anything:1",
        "registry.example.com/mlx/trainer:1",
        "localhost:5000/t:dev",
        "localhost:5000/t:dev2",
    ]:
        chart = any(re.search(regex, image) for regex in regexes)
        assert chart == operator.image_allowed(image), image
    assert "ghcr.io/ulmfit-operator/trainer[:TAG][@DIGEST]" in validation["messageExpression"]


@pytest.mark.parametrize("scope", ["cluster", "namespace"])
def test_the_leader_election_role_follows_the_lease_namespace(helm: Tool, scope: str) -> None:
    args = ["--set", f"rbac.scope={scope}"]
    if scope == "namespace":
        args += ["--set", "watchNamespaces={ml-team}"]
    objects = render(helm, *args, "--set", "leaseNamespace=leases")
    (role,) = [
        r for r in find(objects, "Role") if r["metadata"]["name"].endswith("-leader-election")
    ]
    (binding,) = [
        b
        for b in find(objects, "RoleBinding")
        if b["metadata"]["name"].endswith("-leader-election")
    ]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "leases"
    assert role["rules"] == manifest_rules("leader_election_role.yaml", "Role")
    assert "--lease-namespace=leases" in container_args(objects)


# --- the API server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart_crds(kubectl: Tool, kube_cluster: ControlPlane) -> None:
    """The chart's CRDs and a ServiceMonitor CRD installed, established."""
    kubectl.run(
        "apply",
        "--server-side",
        f"--field-manager={FIELD_MANAGER}",
        "--force-conflicts",
        "-f",
        str(CHART / "crds"),
        kubeconfig=kube_cluster.kubeconfig,
    )
    created = kubectl.run(
        "create",
        "-f",
        "-",
        input=json.dumps(SERVICEMONITOR_CRD),
        kubeconfig=kube_cluster.kubeconfig,
        check=False,
    )
    assert created.returncode == 0 or "AlreadyExists" in created.stderr, created.stderr
    kubectl.run(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/ulmfitjobs.ulmfit.io",
        "crd/servicemonitors.monitoring.coreos.com",
        kubeconfig=kube_cluster.kubeconfig,
    )


@pytest.mark.usefixtures("chart_crds")
@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: s.stem)
def test_api_server_accepts_what_the_chart_renders(
    helm: Tool, kubectl: Tool, kube_cluster: ControlPlane, kube_namespace: str, setup: Path
) -> None:
    release = f"r{secrets.token_hex(3)}"  # cluster-scoped names stay apart between setups
    values = yaml.safe_load(setup.read_text()) or {}
    args = setup_args(setup)
    if values.get("rbac", {}).get("scope") == "namespace":
        args += ["--set", f"watchNamespaces={{{kube_namespace}}}"]
    rendered = helm.run(
        "template", release, str(CHART), "--namespace", kube_namespace, *args
    ).stdout
    objects = [doc for doc in yaml.safe_load_all(rendered) if doc]
    # The admission policy is cluster-scoped: remove it at once, so that it cannot turn away the
    # ULMFiTJobs of later tests (this setup's image patterns may not allow theirs).
    policies = [
        f"{o['kind'].lower()}/{o['metadata']['name']}"
        for o in objects
        if o["kind"].startswith("ValidatingAdmissionPolicy")
    ]
    try:
        result = kubectl.run(
            "apply",
            "--server-side",
            f"--field-manager={FIELD_MANAGER}",
            "-f",
            "-",
            input=rendered,
            kubeconfig=kube_cluster.kubeconfig,
        )
    finally:
        kubectl.run("delete", "--ignore-not-found", *policies, kubeconfig=kube_cluster.kubeconfig)
    applied = [line for line in result.stdout.splitlines() if "serverside-applied" in line]
    assert len(applied) == len(objects), result.stdout
    assert len(policies) == 2, policies
    # What the server stored is what was rendered (nothing dropped by pruning or defaulting).
    deployment = one(objects, "Deployment")
    stored = json.loads(
        kubectl.run(
            "get",
            "deployment",
            deployment["metadata"]["name"],
            "-n",
            kube_namespace,
            "-o",
            "json",
            kubeconfig=kube_cluster.kubeconfig,
        ).stdout
    )
    stored_container = stored["spec"]["template"]["spec"]["containers"][0]
    rendered_container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert stored_container["args"] == rendered_container["args"]
    assert stored_container["securityContext"] == rendered_container["securityContext"]


@pytest.mark.usefixtures("chart_crds")
def test_helm_install_and_uninstall_on_the_api_server(
    helm: Tool, kube_cluster: ControlPlane, kube_namespace: str
) -> None:
    release = f"i{secrets.token_hex(3)}"
    installed = helm.run(
        "install",
        release,
        str(CHART),
        "--namespace",
        kube_namespace,
        kubeconfig=kube_cluster.kubeconfig,
        timeout=120,
    )
    # NOTES tell the user how to submit and watch a job.
    for hint in (
        "kubectl -n NAMESPACE get ulmfitjobs -w",
        "describe ulmfitjob",
        "logs",
        ".status.result",
    ):
        assert hint in installed.stdout, installed.stdout
    status = json.loads(
        helm.run(
            "status",
            release,
            "-n",
            kube_namespace,
            "-o",
            "json",
            kubeconfig=kube_cluster.kubeconfig,
        ).stdout
    )
    assert status["info"]["status"] == "deployed"
    try:
        helm.run(
            "uninstall",
            release,
            "-n",
            kube_namespace,
            kubeconfig=kube_cluster.kubeconfig,
            timeout=120,
        )
    except ToolError as error:  # pragma: no cover - diagnostics only
        pytest.fail(str(error))
