"""The operator, with nothing but the chart's ServiceAccount and RBAC, reconciles a job.

The chart is rendered by the real helm; its ServiceAccount, roles and bindings are applied to the
real API server and a token for the account is all the operator gets. It runs as
`python -m ulmfit_operator` with the container args and environment of the chart's Deployment
(ports moved to free loopback ports), reads the store (SeaweedFS) with its own keys, and must
create the first stage's PyTorchJob and write the job's status. No controller acts on that
PyTorchJob here; tests/e2e/test_cluster_jobs.py installs the chart on the real cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.crds import pytorchjob_crd
from tests.harness.kube import (
    ControlPlane,
    apply_manifests,
    least_privilege_kubeconfig,
    load_manifests,
)
from tests.harness.ports import free_port, wait_for
from tests.harness.s3 import SeaweedS3, s3_server  # noqa: F401 - the fixture
from tests.harness.tools import Tool

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ulmfit-operator"
CRDS = [
    ROOT / "manifests" / "crd" / "ulmfit.io_ulmfitjobs.yaml",
]
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
GROUP, VERSION, PLURAL = "ulmfit.io", "v1alpha1", "ulmfitjobs"


@pytest.fixture(scope="module")
def crds(kube_cluster: ControlPlane) -> None:
    from kubernetes import client

    with kube_cluster.api_client() as api:
        apply_manifests(api, load_manifests([*CRDS, pytorchjob_crd()]))
        custom = client.CustomObjectsApi(api)

        def served() -> bool:
            custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=1)
            custom.list_cluster_custom_object("kubeflow.org", "v1", "pytorchjobs", limit=1)
            return True

        wait_for(served, 60, "the CRDs to be served")


class Operator:
    """The operator process, started as the chart's Deployment would start it."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.metrics_port, self.health_port = free_port(), free_port()
        ports = {"--metrics-port": self.metrics_port, "--health-port": self.health_port}
        self.argv = [sys.executable, "-m", "ulmfit_operator"]
        for arg in args:
            flag = arg.split("=", 1)[0]
            self.argv.append(f"{flag}={ports[flag]}" if flag in ports else arg)
        # Only loopback listeners and a quick resync here; the rest is the chart's.
        self.argv += [
            "--metrics-address=127.0.0.1",
            "--health-address=127.0.0.1",
            "--resync-seconds=1",
        ]
        self.env = env
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
            )

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)

    def _get(self, port: int, path: str) -> str:
        if self.popen is None or self.popen.poll() is not None:
            raise AssertionError(f"the operator exited:\n{self.log_tail()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.read().decode()

    def leading(self) -> bool:
        self._get(self.health_port, "/healthz")
        metrics = self._get(self.metrics_port, "/metrics")
        return re.search(r"^ulmfit_leader(\{\})? 1(\.0)?$", metrics, re.MULTILINE) is not None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _deployment_env(
    container: dict[str, Any], namespace: str, pod: str, s3: SeaweedS3
) -> dict[str, str]:
    """The container's environment as the kubelet would fill it from the chart's references."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBECONFIG", "POD_"))}
    env["PYTHONUNBUFFERED"] = "1"
    field_refs = {"metadata.name": pod, "metadata.namespace": namespace}
    secret = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    for variable in container["env"]:
        source = variable.get("valueFrom", {})
        if "fieldRef" in source:
            env[variable["name"]] = field_refs[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if ref["key"] in secret:
                env[variable["name"]] = secret[ref["key"]]
            else:
                assert ref.get("optional"), f"no value for required {variable['name']}"
        else:
            env[variable["name"]] = variable["value"]
    return env


def _as_dict(value: object) -> dict[str, Any]:
    """The kubernetes client's untyped answers, as the JSON objects they are."""
    assert isinstance(value, dict), value
    return value


@pytest.fixture
def bucket(s3_server: SeaweedS3) -> Iterator[str]:  # noqa: F811 - the imported fixture
    s3_server.start()
    name = s3_server.make_bucket()
    yield name
    with contextlib.suppress(Exception):
        s3_server.remove_bucket(name)


@pytest.mark.usefixtures("crds")
@pytest.mark.parametrize("scope", ["namespace", "cluster"])
def test_operator_with_the_charts_rbac_reconciles_a_job(
    helm: Tool,
    kube_cluster: ControlPlane,
    kube_namespace: str,
    s3_server: SeaweedS3,  # noqa: F811 - the imported fixture
    bucket: str,
    tmp_path: Path,
    scope: str,
) -> None:
    from kubernetes import client

    release = f"op{secrets.token_hex(3)}"
    args = ["--set", f"rbac.scope={scope}"]
    if scope == "namespace":
        args += ["--set", f"watchNamespaces={{{kube_namespace}}}"]
    rendered = helm.run(
        "template", release, str(CHART), "--namespace", kube_namespace, *args
    ).stdout
    objects = [doc for doc in yaml.safe_load_all(rendered) if doc]
    (account,) = [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    kubeconfig = least_privilege_kubeconfig(
        kube_cluster,
        [o for o in objects if o["kind"] in RBAC_KINDS],
        kube_namespace,
        account,
        path=tmp_path / "operator.kubeconfig",
    )
    env = _deployment_env(container, kube_namespace, f"{release}-0", s3_server)
    env["KUBECONFIG"] = str(kubeconfig)
    operator = Operator(container["args"], env, tmp_path / "operator.log")
    assert ("--namespace=" + kube_namespace in operator.argv) == (scope == "namespace")

    name = "rbac-check"
    job = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ULMFiTJob",
        "metadata": {"name": name, "namespace": kube_namespace},
        "spec": {
            "storage": {"s3": {"endpoint": s3_server.url, "bucket": bucket, "prefix": "runs"}},
            "resources": {"cpu": "1", "memory": "1Gi"},
        },
    }
    with kube_cluster.api_client() as api:
        custom = client.CustomObjectsApi(api)
        core = client.CoreV1Api(api)
        operator.start()
        try:
            wait_for(operator.leading, 90, "the operator to take the leader Lease", interval=0.2)
            created = _as_dict(
                custom.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, job)
            )

            def child() -> dict[str, Any] | None:
                listed = custom.list_namespaced_custom_object(
                    "kubeflow.org",
                    "v1",
                    kube_namespace,
                    "pytorchjobs",
                    label_selector=f"ulmfit.io/job={name}",
                )
                items = _as_dict(listed)["items"]
                return items[0] if items else None

            def status() -> dict[str, Any] | None:
                got = _as_dict(
                    custom.get_namespaced_custom_object(
                        GROUP, VERSION, kube_namespace, PLURAL, name
                    )
                )
                stages = (got.get("status") or {}).get("stages") or []
                return got["status"] if any(s.get("child") for s in stages) else None

            try:
                pytorchjob = _as_dict(wait_for(child, 90, "the first stage's PyTorchJob"))
                written = _as_dict(wait_for(status, 60, "the job's status to name its child"))
            except TimeoutError as error:
                raise AssertionError(f"{error}\n--- operator log\n{operator.log_tail()}") from None
        finally:
            operator.stop()
            with contextlib.suppress(Exception):
                custom.delete_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, name)

        owners = pytorchjob["metadata"]["ownerReferences"]
        assert [(o["kind"], o["uid"], o.get("controller")) for o in owners] == [
            ("ULMFiTJob", created["metadata"]["uid"], True)
        ]
        assert pytorchjob["metadata"]["name"] in {s.get("child") for s in written["stages"]}
        config_maps = core.list_namespaced_config_map(
            kube_namespace, label_selector=f"ulmfit.io/job={name}"
        )
        assert config_maps.items, "the stage config ConfigMap was not created"
    assert "Forbidden" not in operator.log_path.read_text(errors="replace"), operator.log_tail()
