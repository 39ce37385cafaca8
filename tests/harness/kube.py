"""A real Kubernetes control plane for tests: etcd and kube-apiserver on loopback (pytest plugin).

Like controller-runtime's envtest, only the API server and its storage run: no scheduler,
controller-manager or kubelet. Nothing therefore acts on objects: namespaces stay
``Terminating`` after deletion, owner references never cascade, Pods never start. Tests play
the missing controllers by writing status themselves.

Fixtures:

``kube_cluster``    (session) a running ``ControlPlane``; ``.kubeconfig`` is an admin kubeconfig
``kube_namespace``  a fresh namespace for one test

Binaries come from ``$ULMFIT_CONTROLPLANE_DIR`` or the cache that
``bash tests/controlplane/build.sh`` fills. ``ULMFIT_KEEP_CONTROLPLANE=1`` keeps the work
directory (server logs, etcd data) after the session.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import json
import os
import re
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from tests.harness import parts
from tests.harness.certs import CertificateAuthority, KeyPair, service_account_keys
from tests.harness.ports import WaitAborted, free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTROLPLANE_MODULE = REPO_ROOT / "tests" / "controlplane"
BUILD_HINT = "run `bash tests/controlplane/build.sh` (or set ULMFIT_CONTROLPLANE_DIR)"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
FIELD_MANAGER = "ulmfit-tests"


# --- where the binaries are -----------------------------------------------------------------------


def pinned_versions(go_mod: Path = CONTROLPLANE_MODULE / "go.mod") -> tuple[str, str]:
    """(kubernetes, etcd) versions that tests/controlplane/go.mod requires, e.g. v1.34.4."""
    text = go_mod.read_text()

    def required(module: str) -> str:
        match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)", text, re.MULTILINE)
        if match is None:
            raise LookupError(f"{go_mod} requires no {module}")
        return match.group(1)

    return required("k8s.io/kubernetes"), required("go.etcd.io/etcd/server/v3")


def cache_dir() -> Path:
    """Where build.sh puts the binaries for the pinned versions."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    kubernetes, etcd = pinned_versions()
    return base / "ulmfit-operator" / "controlplane" / f"{kubernetes}-{etcd}"


def controlplane_dir() -> Path | None:
    """The directory holding executable ``kube-apiserver`` and ``etcd``, or None."""
    configured = os.environ.get("ULMFIT_CONTROLPLANE_DIR")
    directory = Path(configured) if configured else cache_dir()
    binaries = [directory / "kube-apiserver", directory / "etcd"]
    if all(path.is_file() and os.access(path, os.X_OK) for path in binaries):
        return directory
    return None


# --- processes ------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the test process dies, however it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            pr_set_pdeathsig = 1
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class ServerProcess:
    """One server binary in its own process group, its output in a log file."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self._log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {self.argv}\n".encode())
        self._log.flush()
        self._popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env} if self.env is not None else None,
            start_new_session=True,  # its own process group: stop() reaches every child
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def check_running(self) -> None:
        """Raise ``WaitAborted`` with the log's tail if the process has exited."""
        if self._popen is not None and self._popen.poll() is not None:
            raise WaitAborted(
                f"{self.name} exited with status {self._popen.returncode}; "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout``; idempotent."""
        popen, self._popen = self._popen, None
        if popen is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, sig)
                try:
                    popen.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # The leader is gone; take down anything it left in its group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None


# --- kubeconfig -----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_kubeconfig(
    path: Path,
    server: str,
    ca_pem: bytes,
    user: str,
    *,
    client: KeyPair | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> Path:
    """A self-contained kubeconfig (certificates inline) with one context, ``ulmfit-test``."""
    credentials: dict[str, str] = {}
    if client is not None:
        credentials["client-certificate-data"] = _b64(client.cert_pem)
        credentials["client-key-data"] = _b64(client.key_pem)
    if token is not None:
        credentials["token"] = token
    context: dict[str, str] = {"cluster": "ulmfit-test", "user": user}
    if namespace is not None:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "ulmfit-test",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "ulmfit-test", "context": context}],
        "current-context": "ulmfit-test",
        "preferences": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- the control plane ----------------------------------------------------------------------------


@dataclass
class ControlPlane:
    """etcd plus kube-apiserver on loopback, with an admin kubeconfig.

    ``start()`` and ``stop()`` run the pair; ``restart()`` bounces only the API server, so the
    data in etcd survives it. Use as a context manager to guarantee teardown.
    """

    binaries: Path
    workdir: Path
    kubernetes_version: str = field(default_factory=lambda: pinned_versions()[0])
    # The address kube-apiserver binds and advertises; a node cluster puts it on its bridge so
    # that pods reach it too.
    host: str = "127.0.0.1"
    etcd: ServerProcess | None = None
    apiserver: ServerProcess | None = None
    server: str = ""
    kubeconfig: Path = field(init=False)
    ca_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        pki = self.workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        self._ca = CertificateAuthority()
        self.ca_file = self._ca.write(pki)
        self._serving_cert, self._serving_key = self._ca.issue_server(
            "kube-apiserver",
            dns_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ips=sorted({"127.0.0.1", self.host, self.service_ip}),  # and the Service's ClusterIP
        ).write(pki, "apiserver")
        self._admin = self._ca.issue_client("ulmfit-test-admin", groups=["system:masters"])
        self._admin_cert, self._admin_key = self._admin.write(pki, "admin")
        self._sa_public, self._sa_private = service_account_keys().write(pki, "service-account")
        self._etcd_port = 0
        self._secure_port = 0

    # lifecycle

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def service_ip(self) -> str:
        """The ClusterIP of the `kubernetes` Service: the first address of the Service range."""
        import ipaddress

        return str(ipaddress.ip_network(self.service_cluster_ip_range)[1])

    @property
    def service_cluster_ip_range(self) -> str:
        return SERVICE_CLUSTER_IP_RANGE

    def start(self) -> None:
        try:
            self._start_etcd()
            self._secure_port = free_port(self.host)
            self.server = f"https://{self.host}:{self._secure_port}"
            self._start_apiserver()
        except BaseException:
            self.stop()
            raise
        write_kubeconfig(
            self.kubeconfig, self.server, self._ca.cert_pem, "admin", client=self._admin
        )

    def stop(self) -> None:
        """Stop the API server, then etcd; safe to call more than once."""
        for process in (self.apiserver, self.etcd):
            if process is not None:
                process.stop()

    def restart(self) -> None:
        """Stop the API server and start it again on the same address; etcd keeps running."""
        if self.apiserver is not None:
            self.apiserver.stop()
        self._start_apiserver()

    def _start_etcd(self) -> None:
        data_dir = self.workdir / "etcd-data"
        data_dir.mkdir(mode=0o700, exist_ok=True)
        for attempt in range(3):  # a free port may be taken again before etcd binds it
            self._etcd_port, peer_port = free_port(), free_port()
            client_url = f"http://127.0.0.1:{self._etcd_port}"
            peer_url = f"http://127.0.0.1:{peer_port}"
            self.etcd = ServerProcess(
                "etcd",
                [
                    str(self.binaries / "etcd"),
                    "--name=ulmfit-test",
                    f"--data-dir={data_dir}",
                    f"--listen-client-urls={client_url}",
                    f"--advertise-client-urls={client_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=ulmfit-test={peer_url}",
                    "--unsafe-no-fsync",  # throwaway data: skip the disk flushes
                    "--log-level=warn",
                ],
                self.workdir / "etcd.log",
            )
            self.etcd.start()
            try:
                wait_for(self._etcd_healthy, START_TIMEOUT, "etcd /health")
                return
            except WaitAborted:
                self.etcd.stop()
                if attempt == 2 or "address already in use" not in self.etcd.log_tail():
                    raise

    def _etcd_healthy(self) -> bool:
        assert self.etcd is not None
        self.etcd.check_running()
        url = f"http://127.0.0.1:{self._etcd_port}/health"
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.load(response).get("health") == "true"

    def _apiserver_argv(self) -> list[str]:
        return [
            str(self.binaries / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self._etcd_port}",
            f"--bind-address={self.host}",
            f"--advertise-address={self.host}",
            f"--secure-port={self._secure_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={self._serving_cert}",
            f"--tls-private-key-file={self._serving_key}",
            f"--client-ca-file={self.ca_file}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={self._sa_public}",
            f"--service-account-signing-key-file={self._sa_private}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={self.service_cluster_ip_range}",
            "--allow-privileged=true",
            # The `kubernetes` Service's Endpoints may not hold a loopback address, and nothing
            # in a test dials the API server through that Service.
            "--endpoint-reconciler-type=none",
            # No controller creates each namespace's `default` ServiceAccount, so the admission
            # plugin that requires it would reject every Pod (envtest turns it off too).
            "--disable-admission-plugins=ServiceAccount",
            "--profiling=false",
        ]

    def _start_apiserver(self) -> None:
        self.apiserver = ServerProcess(
            "kube-apiserver", self._apiserver_argv(), self.workdir / "kube-apiserver.log"
        )
        for attempt in range(5):
            self.apiserver.start()
            try:
                wait_for(self._apiserver_ready, START_TIMEOUT, "kube-apiserver /readyz")
                self._wait_for_custom_resources()
                return
            except WaitAborted:
                self.apiserver.stop()
                # After restart() the port must stay the same, so wait for it instead.
                if attempt == 4 or "address already in use" not in self.apiserver.log_tail():
                    raise
                time.sleep(1)
            except BaseException:
                self.apiserver.stop()
                raise

    @property
    def ca_pem(self) -> bytes:
        return self._ca.cert_pem

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts the test CA and presents the admin certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(str(self._admin_cert), str(self._admin_key))
        return context

    def _get(self, path: str) -> Any:
        """GET ``path`` as admin; the decoded JSON body (or text, for non-JSON answers)."""
        with urllib.request.urlopen(
            f"{self.server}{path}", timeout=5, context=self.ssl_context()
        ) as response:
            body = response.read().decode()
        return json.loads(body) if body.startswith("{") else body

    def _apiserver_ready(self) -> bool:
        assert self.apiserver is not None
        self.apiserver.check_running()
        return bool(self._get("/readyz") == "ok")

    def _wait_for_custom_resources(self) -> None:
        """After a restart, wait until every established CRD serves its objects again.

        /readyz turns ready before each custom resource's storage has re-initialised; a request
        in that window is refused (429), which a test would see as a failure.
        """
        crds = self._get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")["items"]
        for crd in crds:
            conditions = crd.get("status", {}).get("conditions") or []
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                continue
            spec = crd["spec"]
            version = next(v["name"] for v in spec["versions"] if v.get("served"))
            path = f"/apis/{spec['group']}/{version}/{spec['names']['plural']}?limit=1"
            wait_for(functools.partial(self._get, path), START_TIMEOUT, f"{path} after restart")

    # clients

    def api_client(self, kubeconfig: Path | None = None) -> Any:
        """A new ``kubernetes.client.ApiClient`` (admin unless ``kubeconfig`` is given).

        Close it, or use it as a context manager.
        """
        from kubernetes import config

        return config.new_client_from_config(
            config_file=str(kubeconfig or self.kubeconfig), persist_config=False
        )


# --- least privilege ------------------------------------------------------------------------------


def load_manifests(manifests: Iterable[Mapping[str, Any] | str | Path]) -> list[dict[str, Any]]:
    """Objects from dicts and YAML files (multi-document; ``kind: List`` is flattened)."""
    objects: list[dict[str, Any]] = []
    for item in manifests:
        if isinstance(item, Mapping):
            documents: list[Any] = [dict(item)]
        else:
            documents = list(yaml.safe_load_all(Path(item).read_text()))
        for document in documents:
            if not document:
                continue
            if document.get("kind") == "List":
                objects.extend(document.get("items") or [])
            else:
                objects.append(document)
    return objects


def apply_manifests(
    api_client: Any, objects: Iterable[Mapping[str, Any]], namespace: str | None = None
) -> None:
    """Server-side apply each object; namespaced objects without one go to ``namespace``."""
    from kubernetes.dynamic import DynamicClient

    dynamic = DynamicClient(api_client)
    for obj in objects:
        body = json.loads(json.dumps(obj))  # a deep copy that is plain JSON
        resource = dynamic.resources.get(api_version=body["apiVersion"], kind=body["kind"])
        target_namespace = None
        if resource.namespaced:
            target_namespace = body.setdefault("metadata", {}).get("namespace") or namespace
            if target_namespace is None:
                raise ValueError(f"{body['kind']}/{body['metadata'].get('name')} needs a namespace")
            body["metadata"]["namespace"] = target_namespace
        resource.server_side_apply(
            body=body,
            namespace=target_namespace,
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
        )


def _probe_rule(rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """One concrete (verb, group, resource) that ``rules`` grant, to poll RBAC for."""
    for rule in rules:
        if rule.get("resourceNames") or not rule.get("resources"):
            continue
        verb = next((v for v in rule.get("verbs", []) if v != "*"), "get")
        resource = next((r for r in rule["resources"] if r != "*"), "configmaps")
        group = next((g for g in rule.get("apiGroups", [""]) if g != "*"), "")
        return {"verb": verb, "group": group, "resource": resource.split("/")[0]}
    return None


def _wait_for_bindings(
    api_client: Any, objects: list[dict[str, Any]], namespace: str, service_account: str
) -> None:
    """Wait until the RBAC authorizer's caches hold the bindings just applied for the account.

    RBAC reads roles through informers; a request right after the apply could still be denied.
    """
    from kubernetes import client

    user = f"system:serviceaccount:{namespace}:{service_account}"
    roles: dict[tuple[str, str | None, str], dict[str, Any]] = {}
    for obj in objects:
        if obj.get("kind") == "Role":
            role_ns = obj["metadata"].get("namespace") or namespace
            roles["Role", role_ns, obj["metadata"]["name"]] = obj
        elif obj.get("kind") == "ClusterRole":
            roles["ClusterRole", None, obj["metadata"]["name"]] = obj
    authz = client.AuthorizationV1Api(api_client)
    for binding in objects:
        if binding.get("kind") not in {"RoleBinding", "ClusterRoleBinding"}:
            continue
        if not any(
            subject.get("kind") == "ServiceAccount"
            and subject.get("name") == service_account
            and (subject.get("namespace") or namespace) == namespace
            for subject in binding.get("subjects") or []
        ):
            continue
        ref = binding["roleRef"]
        binding_namespace = None
        if binding["kind"] == "RoleBinding":
            binding_namespace = binding["metadata"].get("namespace") or namespace
        role_namespace = binding_namespace if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], role_namespace, ref["name"]))
        probe = _probe_rule(role.get("rules") or []) if role else None
        if probe is None:
            continue  # a built-in or aggregated role: nothing known to probe
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=user,
                groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                resource_attributes=client.V1ResourceAttributes(
                    namespace=binding_namespace or namespace,
                    verb=probe["verb"],
                    group=probe["group"],
                    resource=probe["resource"],
                ),
            )
        )

        def allowed(review: Any = review) -> bool:
            status = authz.create_subject_access_review(review).status
            return status is not None and bool(status.allowed)

        wait_for(allowed, 30, f"RBAC to grant {user} {probe} via {binding['metadata']['name']}")


def service_account_token(
    api_client: Any, namespace: str, service_account: str, expiration_seconds: int = 3600
) -> str:
    """A bound token for the account from the TokenRequest API."""
    from kubernetes import client

    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
    )
    response = client.CoreV1Api(api_client).create_namespaced_service_account_token(
        service_account, namespace, request
    )
    if response.status is None or not response.status.token:
        raise RuntimeError(f"TokenRequest for {namespace}/{service_account} returned no token")
    return response.status.token


def least_privilege_kubeconfig(
    cluster: ControlPlane,
    manifests: Iterable[Mapping[str, Any] | str | Path],
    namespace: str,
    service_account: str,
    *,
    path: Path | None = None,
    expiration_seconds: int = 3600,
) -> Path:
    """A kubeconfig that acts as ``namespace/service_account`` with only the rights granted.

    As admin: creates ``namespace`` if missing, applies ``manifests`` (ServiceAccount,
    Role/ClusterRole, bindings: dicts or YAML files; namespaced objects without a namespace go
    to ``namespace``), creates the ServiceAccount if they do not, and waits until RBAC grants
    the bindings. Then writes a kubeconfig holding a TokenRequest token for the account.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    objects = load_manifests(manifests)
    with cluster.api_client() as api:
        core = client.CoreV1Api(api)
        try:
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        except ApiException as exc:
            if exc.status != 409:  # 409: it exists already
                raise
        apply_manifests(api, objects, namespace)
        try:
            core.read_namespaced_service_account(service_account, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            core.create_namespaced_service_account(
                namespace,
                client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=service_account)),
            )
        _wait_for_bindings(api, objects, namespace, service_account)
        token = service_account_token(api, namespace, service_account, expiration_seconds)
    target = path or cluster.workdir / f"sa-{namespace}-{service_account}.kubeconfig"
    return write_kubeconfig(
        target,
        cluster.server,
        cluster.ca_pem,
        f"{namespace}:{service_account}",
        token=token,
        namespace=namespace,
    )


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[ControlPlane]:
    """A running etcd + kube-apiserver for the whole session, torn down at its end."""
    binaries = controlplane_dir()
    parts.require(
        binaries is not None,
        f"kube-apiserver/etcd {'/'.join(pinned_versions())}",
        BUILD_HINT,
    )
    assert binaries is not None
    workdir = Path(tempfile.mkdtemp(prefix="ulmfit-kube-"))
    cluster = ControlPlane(binaries=binaries, workdir=workdir)
    with cluster:
        yield cluster
    # ULMFIT_KEEP_CONTROLPLANE=1 keeps the logs and etcd data for a post-mortem.
    if not os.environ.get("ULMFIT_KEEP_CONTROLPLANE"):
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def _namespace_name(test_name: str) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:48].strip("-") or "test"
    return f"{stem}-{secrets.token_hex(3)}"


@pytest.fixture
def kube_namespace(kube_cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new namespace named after the test; deleted afterwards.

    With no namespace controller running, a deleted namespace stays ``Terminating`` and keeps its
    objects; names are unique, so that never leaks into another test.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = _namespace_name(request.node.name)
    with kube_cluster.api_client() as api:
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(
                metadata=client.V1ObjectMeta(name=name, labels={"ulmfit.test/namespace": "true"})
            )
        )
    yield name
    with contextlib.suppress(ApiException, OSError), kube_cluster.api_client() as api:
        client.CoreV1Api(api).delete_namespace(name)
