"""The real Kueue controller-manager as a host process against a test API server.

``KueueController`` runs the binary that ``tests/cluster/controllers/build.sh kueue`` builds,
with a generated ``config.kueue.x-k8s.io/v1beta2`` Configuration: integrations for batch/v1 Job,
Kubeflow PyTorchJob, Kubeflow Trainer v2 TrainJob and KubeRay RayJob, only jobs that carry a
queue-name label are managed, no leader election, every listener on a free loopback port.
Internal certificate management is off, so Kueue touches no Secret or webhook configuration.
For Jobs, PyTorchJobs and RayJobs no webhook configuration points at it either, which is fine
because the operator creates its children suspended already (the one thing Kueue's mutating
webhook would add to them). A TrainJob needs Kueue's mutating webhook (it adds Kueue's own
`runtimePatches` entry), so on the one-node cluster ``node_kueue`` puts Kueue's two TrainJob
webhooks in the admission path of queued TrainJobs, the server on the bridge's host address
with a certificate from a CA of ours (``trainjob_webhooks``).

With internal certificates off, Kueue reads the metrics server's certificate from a path fixed in
its source, ``/etc/kueue/metrics/certs``, and exits when it is missing. In a pod that would be a
Secret volume; here the process runs in its own mount namespace (``unshare --mount``, so root
only) with a certificate of ours bound onto that path. On the host the path stays an empty
directory, so concurrent runs never see each other's files.

Fixture (import it into a test module; it builds on ``kube_cluster``):

``kueue``            (session) a running ``KueueController`` on ``kube_cluster``, with Kueue's,
                     the PyTorchJob and the ray.io CRDs installed
``node_kueue``       (session) the same on the one-node cluster, with its TrainJob webhooks

``create_queue`` gives a namespace a LocalQueue that feeds a new ClusterQueue with a given quota.

``ULMFIT_KEEP_CONTROLPLANE=1`` keeps the work directory with ``kueue.log``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import parts
from tests.harness.certs import CertificateAuthority
from tests.harness.kube import (
    ControlPlane,
    ServerProcess,
    apply_manifests,
    load_manifests,
)
from tests.harness.ports import free_port, wait_for

GROUP = "kueue.x-k8s.io"
# The storage version of every Kueue CRD in v0.17; the CRDs have no conversion webhook, so
# objects are written and read in this version only.
VERSION = "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
QUEUE_LABEL = f"{GROUP}/queue-name"
# TrainJob's integration waits (inside Kueue) until the API server serves TrainJobs: only the
# one-node cluster installs Kubeflow Trainer v2. Kueue turned the PyTorchJob one off by default
# in later releases; it is named here, so both backends are queued.
INTEGRATIONS = (
    "batch/job",
    "kubeflow.org/pytorchjob",
    "trainer.kubeflow.org/trainjob",
    "ray.io/rayjob",
)
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
WEBHOOK_SERVICE = "kueue-webhook-service"
START_TIMEOUT = 90.0


@functools.cache
def kueue_dir() -> Path:
    """The built Kueue (binary ``kueue``, ``crds/``); builds it on first use."""
    from tests.cluster.node import controller_dirs

    try:
        return controller_dirs()["kueue"]
    except (RuntimeError, KeyError) as error:
        parts.require(False, "the Kueue controller", f"`make cluster-build` ({error})")
        raise


def install_crds(api_client: Any, crds: list[dict[str, Any]], timeout: float = 60.0) -> None:
    """Apply CRDs and wait until each is Established (served)."""
    from kubernetes import client

    apply_manifests(api_client, crds)
    extensions = client.ApiextensionsV1Api(api_client)

    def established() -> bool:
        for crd in crds:
            status = extensions.read_custom_resource_definition(crd["metadata"]["name"]).status
            conditions = (status.conditions if status is not None else None) or []
            if not any(c.type == "Established" and c.status == "True" for c in conditions):
                return False
        return True

    wait_for(established, timeout, f"{len(crds)} CRDs to be established")


def install_kueue_crds(api_client: Any) -> None:
    """Kueue's own CRDs plus those of the job kinds it is configured to manage.

    An integration whose CRD is missing at start is not fatal: Kueue retries it in the
    background with a backoff of up to two minutes, so a test would wait that long for the
    first admission. Installing them first avoids that.
    """
    from tests.harness.crds import pytorchjob_crd, ray_crds

    crds = sorted((kueue_dir() / "crds").glob("*.yaml"))
    install_crds(api_client, load_manifests([*crds, pytorchjob_crd(), *ray_crds()]))


@dataclass
class KueueController:
    """One Kueue controller-manager process acting as the kubeconfig's user."""

    binary: Path
    kubeconfig: Path
    workdir: Path
    namespace: str = "kueue-system"
    integrations: tuple[str, ...] = INTEGRATIONS
    webhook_host: str = "127.0.0.1"
    """Where its webhook server listens: the bridge's host address where the API server calls
    it (`trainjob_webhooks`)."""
    process: ServerProcess | None = None
    health_port: int = field(init=False, default=0)
    webhook_port: int = field(init=False, default=0)
    ca: CertificateAuthority | None = field(init=False, default=None)

    def __enter__(self) -> KueueController:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @staticmethod
    def can_run() -> str | None:
        """Why this machine cannot run it (None when it can)."""
        if os.geteuid() != 0:
            return "needs root (a private mount namespace for its fixed metrics-cert path)"
        if shutil.which("unshare") is None or shutil.which("mount") is None:
            return "needs unshare and mount (util-linux)"
        return None

    @property
    def log_path(self) -> Path:
        return self.workdir / "kueue.log"

    def configuration(self, webhook_port: int, metrics_port: int) -> dict[str, Any]:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": self.namespace,
            "manageJobsWithoutQueueName": False,
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
            "webhook": {
                "host": self.webhook_host,
                "port": webhook_port,
                "certDir": str(self.workdir / "webhook-certs"),
            },
            # The on-demand visibility API server would bind 0.0.0.0:8082 and read its
            # certificate from another fixed path; nothing here uses it.
            "featureGates": {"VisibilityOnDemand": False},
            "integrations": {"frameworks": list(self.integrations)},
        }

    def _write_certs(self) -> None:
        ca = self.ca = CertificateAuthority("ulmfit-test-kueue-ca")
        names = ["localhost", f"{WEBHOOK_SERVICE}.{self.namespace}.svc"]
        serving = ca.issue_server("kueue", names, sorted({"127.0.0.1", self.webhook_host}))
        for name in ("webhook-certs", "metrics-certs"):
            directory = self.workdir / name
            directory.mkdir(parents=True, exist_ok=True)
            serving.write(directory, "tls")

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_certs()
        # The bind-mount target must exist; an empty directory is all the host keeps.
        METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # a free port may be taken again before Kueue binds it
            self.health_port = free_port()
            self.webhook_port = free_port(self.webhook_host)
            config = self.workdir / "kueue-config.yaml"
            config.write_text(
                yaml.safe_dump(self.configuration(self.webhook_port, free_port()))
            )
            script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
            argv = [
                "unshare",
                "--mount",
                "--propagation=private",
                "sh",
                "-c",
                script,
                "kueue-in-namespace",
                str(self.workdir / "metrics-certs"),
                str(METRICS_CERT_DIR),
                str(self.binary),
                f"--config={config}",
                f"--kubeconfig={self.kubeconfig}",
                "--zap-log-level=2",
            ]
            self.process = ServerProcess("kueue", argv, self.log_path)
            self.process.start()
            try:
                wait_for(self._ready, START_TIMEOUT, "Kueue /readyz", interval=0.25)
                return
            except BaseException:
                tail = self.process.log_tail()
                self.stop()
                if attempt == 2 or "address already in use" not in tail:
                    raise

    def trainjob_webhooks(self) -> list[dict[str, Any]]:
        """What puts Kueue's TrainJob webhooks in the admission path of queued TrainJobs: a
        Service whose one endpoint is its webhook server, and the two webhook configurations.
        Its TrainJob integration needs the mutating one: it adds Kueue's own entry to the
        TrainJob's `runtimePatches`, which Kueue fills in when it admits the job (without it,
        admission fails with "kueue runtime patch not found")."""
        import base64

        assert self.ca is not None, "start it first"
        selector = {"matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]}
        bundle = base64.b64encode(self.ca.cert_pem).decode()

        def configuration(
            kind: str, name: str, path: str, operations: list[str]
        ) -> dict[str, Any]:
            webhook = {
                "name": name,
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "objectSelector": selector,
                "rules": [
                    {
                        "apiGroups": ["trainer.kubeflow.org"],
                        "apiVersions": ["v1alpha1"],
                        "operations": operations,
                        "resources": ["trainjobs"],
                    }
                ],
                "clientConfig": {
                    "caBundle": bundle,
                    "service": {
                        "name": WEBHOOK_SERVICE,
                        "namespace": self.namespace,
                        "path": path,
                        "port": 443,
                    },
                },
            }
            return {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": kind,
                "metadata": {"name": f"ulmfit-test-{name}"},
                "webhooks": [webhook],
            }

        return [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": WEBHOOK_SERVICE, "namespace": self.namespace},
                "spec": {"ports": [{"port": 443, "targetPort": self.webhook_port}]},
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{WEBHOOK_SERVICE}-host",
                    "namespace": self.namespace,
                    "labels": {"kubernetes.io/service-name": WEBHOOK_SERVICE},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [self.webhook_host], "conditions": {"ready": True}}],
                "ports": [{"port": self.webhook_port, "protocol": "TCP"}],
            },
            configuration(
                "MutatingWebhookConfiguration",
                "mtrainjob.kb.io",
                "/mutate-trainer-kubeflow-org-v1alpha1-trainjob",
                ["CREATE"],  # as Kueue registers it: it appends its entry on each call
            ),
            configuration(
                "ValidatingWebhookConfiguration",
                "vtrainjob.kb.io",
                "/validate-trainer-kubeflow-org-v1alpha1-trainjob",
                ["CREATE", "UPDATE"],
            ),
        ]

    def _ready(self) -> bool:
        import urllib.request

        assert self.process is not None
        self.process.check_running()
        url = f"http://127.0.0.1:{self.health_port}/readyz"
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


# --- queues ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Queue:
    """What ``create_queue`` made: jobs labelled ``QUEUE_LABEL: local_queue`` in ``namespace``."""

    namespace: str
    local_queue: str
    cluster_queue: str
    flavor: str

    @property
    def labels(self) -> dict[str, str]:
        return {QUEUE_LABEL: self.local_queue}


def queue_objects(
    namespace: str, quota: Mapping[str, str], name: str | None = None
) -> list[dict[str, Any]]:
    """A ResourceFlavor, a ClusterQueue with ``quota`` (resource: quantity) on it for every
    namespace, and a LocalQueue in ``namespace`` that feeds it, all called ``name``."""
    name = name or f"q-{namespace}"[:63]
    return [
        {"apiVersion": API_VERSION, "kind": "ResourceFlavor", "metadata": {"name": name}},
        {
            "apiVersion": API_VERSION,
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                # A null selector admits no namespace at all; an empty one admits every one.
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": list(quota),
                        "flavors": [
                            {
                                "name": name,
                                "resources": [
                                    {"name": resource, "nominalQuota": amount}
                                    for resource, amount in quota.items()
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": API_VERSION,
            "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterQueue": name},
        },
    ]


def create_queue(
    api_client: Any, namespace: str, quota: Mapping[str, str], name: str | None = None
) -> Queue:
    """Create ``queue_objects`` and wait until Kueue reports the ClusterQueue and LocalQueue
    Active (a workload submitted before that would wait for the next requeue)."""
    from kubernetes.dynamic import DynamicClient

    objects = queue_objects(namespace, quota, name)
    apply_manifests(api_client, objects)
    resources = DynamicClient(api_client).resources
    for obj in objects[1:]:
        resource = resources.get(api_version=API_VERSION, kind=obj["kind"])
        obj_namespace = obj["metadata"].get("namespace")

        def active(resource: Any = resource, obj: Any = obj, ns: Any = obj_namespace) -> bool:
            current = resource.get(name=obj["metadata"]["name"], namespace=ns).to_dict()
            conditions = (current.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Active" and c["status"] == "True" for c in conditions)

        wait_for(active, 30, f"{obj['kind']} {obj['metadata']['name']} to be Active")
    flavor = objects[0]["metadata"]["name"]
    return Queue(namespace, objects[2]["metadata"]["name"], objects[1]["metadata"]["name"], flavor)


def delete_queue(api_client: Any, queue: Queue) -> None:
    """Remove the cluster-scoped objects of ``queue`` (the LocalQueue goes with its namespace)."""
    from kubernetes.client.exceptions import ApiException
    from kubernetes.dynamic import DynamicClient

    resources = DynamicClient(api_client).resources
    for kind, name in (("ClusterQueue", queue.cluster_queue), ("ResourceFlavor", queue.flavor)):
        with contextlib.suppress(ApiException):
            resources.get(api_version=API_VERSION, kind=kind).delete(name=name)


def workloads_of(api_client: Any, namespace: str, owner_uid: str) -> list[dict[str, Any]]:
    """The Workloads Kueue made for the job with ``owner_uid``."""
    from kubernetes.dynamic import DynamicClient

    resource = DynamicClient(api_client).resources.get(api_version=API_VERSION, kind="Workload")
    items = resource.get(namespace=namespace).to_dict()["items"]
    return [
        w
        for w in items
        if any(o.get("uid") == owner_uid for o in w["metadata"].get("ownerReferences") or [])
    ]


def condition(obj: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for entry in (obj.get("status") or {}).get("conditions") or []:
        if entry.get("type") == kind:
            return dict(entry)
    return None


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kueue(kube_cluster: ControlPlane) -> Iterator[KueueController]:
    """Kueue on the session's API server, as its admin; stopped at the end of the session."""
    from kubernetes import client

    why_not = KueueController.can_run()
    parts.require(why_not is None, "the Kueue controller", str(why_not))
    binary = kueue_dir() / "kueue"
    with kube_cluster.api_client() as api:
        install_kueue_crds(api)
        with contextlib.suppress(Exception):  # 409: a previous run's
            client.CoreV1Api(api).create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name="kueue-system"))
            )
    workdir = Path(tempfile.mkdtemp(prefix="ulmfit-kueue-"))
    with KueueController(binary, kube_cluster.kubeconfig, workdir) as controller:
        yield controller
    if not os.environ.get("ULMFIT_KEEP_CONTROLPLANE"):
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def node_kueue(node_cluster: Any) -> Iterator[KueueController]:
    """Kueue on the one-node cluster (tests/harness/cluster.py), as its admin: there the real
    Training Operator, Job controller, kubelet and garbage collector do the rest."""
    from kubernetes import client

    why_not = KueueController.can_run()
    parts.require(why_not is None, "the Kueue controller", str(why_not))
    binary = kueue_dir() / "kueue"
    with node_cluster.api_client() as api:
        install_kueue_crds(api)
        with contextlib.suppress(Exception):  # 409: it exists
            client.CoreV1Api(api).create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name="kueue-system"))
            )
    workdir = Path(tempfile.mkdtemp(prefix="ulmfit-kueue-node-"))
    kubeconfig, host = Path(node_cluster.kubeconfig), node_cluster.host
    with KueueController(binary, kubeconfig, workdir, webhook_host=host) as controller:
        with node_cluster.api_client() as api:
            apply_manifests(api, controller.trainjob_webhooks())
        try:
            yield controller
        finally:
            with node_cluster.api_client() as api:
                for kind in ("mutating", "validating"):
                    with contextlib.suppress(Exception):
                        getattr(client.AdmissionregistrationV1Api(api),
                                f"delete_{kind}_webhook_configuration")(
                            f"ulmfit-test-{kind[0]}trainjob.kb.io")  # fmt: skip
    if not os.environ.get("ULMFIT_KEEP_CLUSTER"):
        shutil.rmtree(workdir, ignore_errors=True)
