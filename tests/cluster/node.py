"""A real one-node Kubernetes: the control plane, a kubelet on containerd, kube-proxy, CoreDNS.

``NodeCluster`` extends the API-server-only ``ControlPlane`` of ``tests.harness.kube`` with

- kube-controller-manager (garbage collector, Job, namespace, ServiceAccount-token controllers)
  and kube-scheduler, on loopback;
- containerd (Debian's package, cgroupfs, CNI bridge + host-local) with the images this project
  builds imported (no registry is reachable, so pulls never happen);
- kubelet (cgroupfs driver, its API on the bridge address) registered as node ``NODE_NAME``;
- kube-proxy in iptables mode, so ClusterIPs (the `kubernetes` Service among them) work;
- CoreDNS (the project's trimmed build, no forwarding) on the bridge address, the pods' resolver;
- the real Kubeflow Training Operator, Kubeflow Trainer v2 with JobSet, and the KubeRay operator
  as host processes, with the CRDs from their own module trees, and every one of their webhooks
  in the admission path (`tests.cluster.webhooks` for Trainer's and JobSet's).

Every binary comes from a cache filled by ``tests/controlplane/build.sh`` and
``tests/cluster/controllers/build.sh``; the network is ``tests.cluster.network``'s bridge.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import network, webhooks
from tests.harness.kube import (
    ControlPlane,
    ServerProcess,
    apply_manifests,
    cache_dir,
    write_kubeconfig,
)
from tests.harness.ports import free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_NAME = "ulmfit-node"
CONTROLLERS_BUILD = REPO_ROOT / "tests" / "cluster" / "controllers" / "build.sh"
NODE_READY_TIMEOUT = 180.0
# The namespace where the real third-party controllers keep their own objects.
CONTROLLERS_NAMESPACE = "kubeflow"
TRAINING_OPERATOR_SECRET = "training-operator-webhook-cert"
TRAINING_OPERATOR_CERT_DIR = webhooks.WEBHOOK_CERT_DIR
# The Training Operator's default; benchmarks/apply_to_pod.py compares others.
TRAINING_OPERATOR_THREADS = 1


def controller_dirs() -> dict[str, Path]:
    """Build (or find cached) the third-party controllers: {name: directory}."""
    result = subprocess.run(
        ["bash", str(CONTROLLERS_BUILD)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{CONTROLLERS_BUILD} failed:\n{result.stderr[-4000:]}")
    dirs: dict[str, Path] = {}
    for line in result.stdout.splitlines():
        name, sep, directory = line.partition("=")
        if sep:
            dirs[name.strip()] = Path(directory.strip())
    return dirs


@dataclass
class NodeCluster(ControlPlane):
    """A control plane plus one real node; ``start()`` brings up everything, ``stop()`` it all."""

    host: str = network.HOST_IP
    controllers: dict[str, Path] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of `start()` (``start``) and of the image import within it (``image import``)."""
    processes: list[ServerProcess] = field(default_factory=list)
    containerd_socket: Path = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.containerd_socket = self.workdir / "containerd" / "containerd.sock"
        pki = self.workdir / "pki"
        self._node_client = self._ca.issue_client(f"system:node:{NODE_NAME}", ["system:nodes"])
        self._kubelet_serving = self._ca.issue_server(NODE_NAME, [NODE_NAME], [self.host])
        self._kubelet_serving.write(pki, "kubelet")
        self._apiserver_kubelet_client = self._ca.issue_client(
            "kube-apiserver-kubelet-client", ["system:masters"]
        )
        self._apiserver_kubelet_client.write(pki, "apiserver-kubelet-client")
        self._controller_manager = self._ca.issue_client("system:kube-controller-manager")
        self._scheduler = self._ca.issue_client("system:kube-scheduler")
        self._proxy = self._ca.issue_client("system:kube-proxy", ["system:node-proxier"])

    @property
    def service_cluster_ip_range(self) -> str:
        return network.SERVICE_CIDR

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        began = time.monotonic()
        try:
            network.bridge_up()
            super().start()
            self._start_controller_manager()
            self._start_scheduler()
            self._start_containerd()
            importing = time.monotonic()
            self._import_images()
            self.seconds["image import"] = time.monotonic() - importing
            self._start_kubelet()
            self._start_proxy()
            self._start_coredns()
            self._wait_for_node()
            self._start_controllers()
            self.seconds["start"] = time.monotonic() - began
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        # The node's processes; the containers (while containerd still runs, so that a kept
        # root holds no stale ones); containerd; what the pods held; then the control plane.
        runtime = [p for p in self.processes if p.name == "containerd"]
        for process in reversed(self.processes):
            if process not in runtime:
                process.stop()
        if any(p.running for p in runtime):
            self._remove_containers()
        for process in runtime:
            process.stop()
        self.processes.clear()
        self._remove_leftover_sandboxes()
        super().stop()
        self._unmount_kubelet_dirs()
        with contextlib.suppress(Exception):
            network.bridge_down()

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> ServerProcess:
        process = ServerProcess(name, argv, self.workdir / f"{name}.log", env=env)
        process.start()
        self.processes.append(process)
        return process

    def _component_kubeconfig(self, name: str, client: Any) -> Path:
        return write_kubeconfig(
            self.workdir / f"{name}.kubeconfig", self.server, self._ca.cert_pem, name, client=client
        )

    # --- the API server for a cluster with a node ----------------------------------------------

    def _apiserver_argv(self) -> list[str]:
        argv = [
            arg
            for arg in super()._apiserver_argv()
            if not arg.startswith(
                ("--authorization-mode", "--endpoint-reconciler-type", "--disable-admission")
            )
        ]
        pki = self.workdir / "pki"
        return [
            *argv,
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    # --- controller-manager and scheduler -------------------------------------------------------

    def _start_controller_manager(self) -> None:
        kubeconfig = self._component_kubeconfig(
            "kube-controller-manager", self._controller_manager
        )
        self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self._sa_private}",
                f"--root-ca-file={self.ca_file}",
                f"--service-cluster-ip-range={network.SERVICE_CIDR}",
                "--allocate-node-cidrs=false",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route",
                # One node: pods of a node that stops answering go quickly, not after 5 minutes.
                "--node-monitor-grace-period=20s",
                "--terminated-pod-gc-threshold=100",
            ],
        )

    def _start_scheduler(self) -> None:
        kubeconfig = self._component_kubeconfig("kube-scheduler", self._scheduler)
        self._spawn(
            "kube-scheduler",
            [
                str(self.binaries / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
            ],
        )

    # --- containerd -----------------------------------------------------------------------------

    def _start_containerd(self) -> None:
        base = self.workdir / "containerd"
        cni_conf = self.workdir / "cni"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-ulmfit.conflist").write_text(network.cni_config())
        config = base / "config.toml"
        base.mkdir(parents=True, exist_ok=True)
        pause = self.images.get("pause", "localhost/ulmfit-test/pause:1")
        runc = os.environ.get("ULMFIT_TEST_RUNC")
        binary_name = f'\n        BinaryName = "{runc}"' if runc else ""
        config.write_text(
            f"""version = 2
root = "{self._containerd_root()}"
state = "{base / 'state'}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{self.containerd_socket}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # This machine's root lacks CAP_SYS_RESOURCE (a sandbox): runc cannot lower a container's OOM
  # score below containerd's, and would fail every pod on the kubelet's -998 for the sandbox.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false{binary_name}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_plugin_dir()}"
    conf_dir = "{cni_conf}"
"""
        )
        process = self._spawn("containerd", ["containerd", f"--config={config}"])

        def serving() -> bool:
            process.check_running()
            result = subprocess.run(
                ["ctr", "--address", str(self.containerd_socket), "version"],
                capture_output=True,
                timeout=10,
                check=False,
            )
            return result.returncode == 0

        wait_for(serving, 60, "containerd to serve")

    def _containerd_root(self) -> Path:
        """containerd's content and snapshots: kept in the cache between clusters, so the
        trainer image (several GB) is imported once, not at every start. A second cluster on the
        machine at the same time gets a fresh root of its own."""
        import fcntl

        shared = cache_dir().parents[1] / "containerd-root"
        shared.mkdir(parents=True, exist_ok=True)
        lock = (shared / ".lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            return self.workdir / "containerd" / "root"
        self._root_lock = lock  # held until this process ends
        return shared

    def _import_images(self) -> None:
        from tests.cluster import images

        self.images.update(images.ensure_images(str(self.containerd_socket)))

    def _remove_containers(self) -> None:
        def ctr(*args: str) -> subprocess.CompletedProcess[str]:
            argv = ["ctr", "--address", str(self.containerd_socket), "-n", "k8s.io", *args]
            return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)

        tasks = ctr("tasks", "ls", "-q").stdout.split()
        for task in tasks:
            ctr("tasks", "kill", "-s", "SIGKILL", task)
        for task in tasks:
            ctr("tasks", "rm", "-f", task)
        containers = ctr("containers", "ls", "-q").stdout.split()
        if containers:
            ctr("containers", "rm", *containers)

    def _remove_leftover_sandboxes(self) -> None:
        """Kill every container of this containerd and free what their pods held.

        Containers outlive the kubelet and containerd (each has its own shim), so stopping the
        processes is not enough: the shims, the pods' network namespaces and the IP addresses
        host-local handed out must go too, or the next cluster inherits them.
        """
        socket = str(self.containerd_socket).encode()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                args = cmdline.read_bytes().split(b"\0")
                if args[0].endswith(b"containerd-shim-runc-v2") and socket in args:
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
        netns = Path("/var/run/netns")
        for namespace in sorted(netns.glob("cni-*")) if netns.is_dir() else []:
            subprocess.run(["ip", "netns", "del", namespace.name], capture_output=True, check=False)
        shutil.rmtree(Path("/var/lib/cni/networks") / network.NETWORK_NAME, ignore_errors=True)
        shutil.rmtree(TRAINING_OPERATOR_CERT_DIR.parent, ignore_errors=True)

    # --- kubelet, kube-proxy, CoreDNS ------------------------------------------------------------

    def _start_kubelet(self) -> None:
        kubelet_dir = self.workdir / "kubelet"
        kubelet_dir.mkdir(parents=True, exist_ok=True)
        pki = self.workdir / "pki"
        # Pods with dnsPolicy Default get this resolv.conf: the cluster's resolver only, so no
        # pod ever asks a DNS server outside this machine.
        host_resolv = self.workdir / "resolv.conf"
        host_resolv.write_text(f"nameserver {self.host}\n")
        self._kubelet_healthz = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.host,
            "port": free_port(self.host),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self._kubelet_healthz,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.ca_file)},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(pki / "kubelet.crt"),
            "tlsPrivateKeyFile": str(pki / "kubelet.key"),
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "clusterDNS": [self.host],
            "clusterDomain": network.CLUSTER_DOMAIN,
            "resolvConf": str(host_resolv),
            "failSwapOn": False,
            "failCgroupV1": False,
            # The images were imported, never pulled: the kubelet must not collect them, and
            # it must not reclaim disk either. On a disk shared with build caches the eviction
            # manager saw disk pressure and deleted the unused trainer image between two tests;
            # naming only a memory threshold turns the disk signals off.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "50Mi"},
            "serializeImagePulls": False,
            "registerNode": True,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "protectKernelDefaults": False,
            "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s",
            "maxPods": 110,
            "shutdownGracePeriod": "0s",
        }
        config_path = self.workdir / "kubelet-config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        kubeconfig = self._component_kubeconfig("kubelet", self._node_client)
        self._spawn(
            "kubelet",
            [
                str(self.binaries / "kubelet"),
                f"--config={config_path}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={kubelet_dir}",
                f"--cert-dir={pki}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={self.host}",
                "--v=1",
            ],
        )

    def _start_proxy(self) -> None:
        kubeconfig = self._component_kubeconfig("kube-proxy", self._proxy)
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": network.POD_CIDR,
            "bindAddress": self.host,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            # Masquerade nothing: no packet is meant to leave the bridge.
            "iptables": {"masqueradeAll": False, "localhostNodePorts": False},
            "nodePortAddresses": [f"{self.host}/32"],
            "conntrack": {"maxPerCore": 0},
        }
        config_path = self.workdir / "kube-proxy-config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self._spawn(
            "kube-proxy", [str(self.binaries / "kube-proxy"), f"--config={config_path}", "--v=1"]
        )

    def _start_coredns(self) -> None:
        coredns = self.controllers["coredns"] / "coredns"
        # Cluster-admin for brevity: CoreDNS only lists and watches Services, EndpointSlices,
        # Namespaces and Pods.
        kubeconfig = self._component_kubeconfig(
            "coredns", self._ca.issue_client("system:coredns", ["system:masters"])
        )
        corefile = self.workdir / "Corefile"
        health, ready = free_port(), free_port()
        corefile.write_text(
            f""".:53 {{
    bind {self.host}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    kubernetes {network.CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        )
        process = self._spawn("coredns", [str(coredns), "-conf", str(corefile)])
        wait_until_ok(process, f"http://127.0.0.1:{ready}/ready", 60, "CoreDNS /ready")

    def _wait_for_node(self) -> None:
        from kubernetes import client

        def node_ready() -> bool:
            for process in self.processes:
                process.check_running()
            with self.api_client() as api:
                node = client.CoreV1Api(api).read_node(NODE_NAME)
            return any(
                c.type == "Ready" and c.status == "True" for c in node.status.conditions or []
            )

        wait_for(node_ready, NODE_READY_TIMEOUT, f"node {NODE_NAME} Ready", interval=1)

    # --- the real third-party controllers -------------------------------------------------------

    def _start_controllers(self) -> None:
        from kubernetes import client

        with self.api_client() as api:
            crds: list[dict[str, Any]] = []
            for name in ("training-operator", "trainer", "jobset", "kuberay"):
                for path in sorted((self.controllers[name] / "crds").glob("*.yaml")):
                    crds.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
            # Server-side: Trainer's runtime CRDs are ~0.9 MB each, past what a client-side
            # apply's last-applied annotation may hold.
            apply_manifests(api, crds)
            for namespace in (CONTROLLERS_NAMESPACE, webhooks.TRAINER.namespace,
                              webhooks.JOBSET.namespace):  # fmt: skip
                with contextlib.suppress(Exception):
                    client.CoreV1Api(api).create_namespace(
                        client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace))
                    )
            wait_for(lambda: self._crds_established(api, crds), 60, "third-party CRDs")
        self._start_training_operator()
        self._start_jobset()
        self._start_trainer()
        self._start_kuberay()

    @staticmethod
    def _crds_established(api: Any, crds: list[dict[str, Any]]) -> bool:
        from kubernetes import client

        extensions = client.ApiextensionsV1Api(api)
        for crd in crds:
            status = extensions.read_custom_resource_definition(crd["metadata"]["name"]).status
            if not any(c.type == "Established" and c.status == "True" for c in status.conditions):
                return False
        return True

    def restart_training_operator(self, threads: int) -> None:
        """Run the Training Operator again with `--controller-threads=threads` (benchmarks)."""
        for process in [p for p in self.processes if p.name == "training-operator"]:
            process.stop()
            self.processes.remove(process)
        self._start_training_operator(threads)

    def _start_training_operator(self, threads: int = 0) -> None:
        """The Training Operator with its validating webhook really in the admission path.

        Its certificate rotator writes a serving certificate for `training-operator.kubeflow.svc`
        into a Secret and the CA into our ValidatingWebhookConfiguration; the Service of that
        name has one endpoint, this host on the bridge, where the webhook server listens. So
        every PyTorchJob the operator creates passes the real validation first.
        """
        from kubernetes import client

        directory = self.controllers["training-operator"]
        webhook_port = free_port(self.host)
        with self.api_client() as api:
            objects = training_operator_objects(self.host, webhook_port)
            apply_manifests(api, objects)
            # The rotator only updates this Secret; an empty one must exist.
            with contextlib.suppress(Exception):
                client.CoreV1Api(api).create_namespaced_secret(
                    CONTROLLERS_NAMESPACE,
                    client.V1Secret(metadata=client.V1ObjectMeta(name=TRAINING_OPERATOR_SECRET)),
                )
        process = self._spawn(
            "training-operator",
            [
                str(directory / "training-operator"),
                f"--kubeconfig={self.kubeconfig}",
                "--enable-scheme=pytorchjob",
                f"--metrics-bind-address=127.0.0.1:{free_port()}",
                f"--health-probe-bind-address=127.0.0.1:{(health := free_port())}",
                f"--webhook-server-port={webhook_port}",
                f"--controller-threads={threads or TRAINING_OPERATOR_THREADS}",
                *self._init_container_flags(),
                "--leader-elect=false",
            ],
            env={"MY_POD_NAMESPACE": CONTROLLERS_NAMESPACE},
        )

        self._mount_webhook_certs(process)
        wait_until_ok(
            process,
            f"http://127.0.0.1:{health}/readyz",
            120,
            "the Training Operator's webhook to serve",
        )

    def _start_jobset(self) -> None:
        """JobSet, which runs the JobSet each TrainJob becomes (its webhooks on JobSets and on
        their pods in the admission path)."""
        binary = self.controllers["jobset"] / "jobset"

        def configuration(webhook: int, health: int) -> dict[str, Any]:
            return webhooks.jobset_configuration(self.host, webhook, health)

        self._start_webhook_manager("jobset", [str(binary)], webhooks.JOBSET, configuration)

    def _start_trainer(self) -> None:
        """Kubeflow Trainer v2's controller manager: TrainJob -> JobSet, its webhooks (TrainJob
        defaulting and validation, runtime validation) in the admission path."""
        binary = self.controllers["trainer"] / "trainer-controller-manager"

        def configuration(webhook: int, health: int) -> dict[str, Any]:
            return webhooks.trainer_configuration(self.host, webhook, health)

        self._start_webhook_manager("trainer", [str(binary)], webhooks.TRAINER, configuration)

    def _start_webhook_manager(
        self,
        name: str,
        argv: list[str],
        server: webhooks.WebhookServer,
        configuration: Any,
    ) -> None:
        """Run a manager whose rotator certifies its own webhooks (see tests.cluster.webhooks)."""
        from kubernetes import client

        webhook_port, health = free_port(self.host), free_port()
        config = self.workdir / f"{name}-config.yaml"
        config.write_text(yaml.safe_dump(configuration(webhook_port, health)))
        cert_dir = self.workdir / f"{name}-certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        webhooks.WEBHOOK_CERT_DIR.mkdir(parents=True, exist_ok=True)
        with self.api_client() as api:
            apply_manifests(api, server.objects(self.host, webhook_port))
            with contextlib.suppress(Exception):  # the rotator only updates it
                client.CoreV1Api(api).create_namespaced_secret(
                    server.namespace,
                    client.V1Secret(metadata=client.V1ObjectMeta(name=server.secret)),
                )
        process = self._spawn(
            name,
            webhooks.in_own_cert_dir(
                cert_dir,
                [*argv, f"--config={config}", f"--kubeconfig={self.kubeconfig}"],
            ),
        )

        def certificates() -> dict[str, str] | None:
            process.check_running()
            with self.api_client() as api:
                secret = client.CoreV1Api(api).read_namespaced_secret(
                    server.secret, server.namespace
                )
            data = secret.data or {}
            wanted = ("ca.crt", "tls.crt", "tls.key")
            return {key: data[key] for key in wanted} if all(k in data for k in wanted) else None

        webhooks.write_certs(wait_for(certificates, 60, f"{name}'s webhook certificate"), cert_dir)
        wait_until_ok(process, f"http://127.0.0.1:{health}/readyz", 120, f"{name}'s webhooks")

    def _init_container_flags(self) -> list[str]:
        """The init container of PyTorchJob workers: wait until the master's name resolves.

        The Training Operator's default uses alpine (Docker Hub, not reachable here) and a bare
        `nslookup NAME`; busybox 1.35's nslookup exits 1 when any domain of the search list lacks
        the name, even after finding it. So: our busybox image, and a lookup of the name in the
        pod's own namespace domain (the first search domain), fully qualified.
        """
        template = self.workdir / "pytorch-init-container.yaml"
        wait = (
            "domain=$(sed -n 's/^search \\([^ ]*\\).*/\\1/p' /etc/resolv.conf); "
            "for i in $(seq {{.MaxTries}}); do "
            "nslookup {{.MasterAddr}}.$domain. && exit 0; echo waiting for master; sleep 2; "
            "done; exit 1"
        )
        container = {
            "name": "init-pytorch",
            "image": "{{.InitContainerImage}}",
            "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", wait],
            "resources": {
                "requests": {"cpu": "50m", "memory": "10Mi"},
                "limits": {"cpu": "100m", "memory": "20Mi"},
            },
        }
        template.write_text(yaml.safe_dump([container], width=1000))
        return [
            f"--pytorch-init-container-image={self.images['init']}",
            f"--pytorch-init-container-template-file={template}",
        ]

    def _mount_webhook_certs(self, process: ServerProcess) -> None:
        """Do what the kubelet does for the operator's pod: put the Secret's certs in its dir.

        The rotator fills the Secret, then waits for the files to appear where a Secret volume
        would be mounted (a fixed path in the Training Operator's source).
        """
        import base64

        from kubernetes import client

        def certificates() -> dict[str, str] | None:
            process.check_running()
            with self.api_client() as api:
                secret = client.CoreV1Api(api).read_namespaced_secret(
                    TRAINING_OPERATOR_SECRET, CONTROLLERS_NAMESPACE
                )
            data = secret.data or {}
            wanted = ("ca.crt", "tls.crt", "tls.key")
            return {key: data[key] for key in wanted} if all(k in data for k in wanted) else None

        files = wait_for(certificates, 60, "the Training Operator's webhook certificate")
        TRAINING_OPERATOR_CERT_DIR.mkdir(parents=True, exist_ok=True)
        for name, value in files.items():
            path = TRAINING_OPERATOR_CERT_DIR / name
            path.write_bytes(base64.b64decode(value))
            path.chmod(0o600)

    def _start_kuberay(self) -> None:
        directory = self.controllers["kuberay"]
        self._spawn(
            "kuberay-operator",
            [
                str(directory / "ray-operator"),
                f"--kubeconfig={self.kubeconfig}",
                "--metrics-addr=0",
                f"--health-probe-bind-address=127.0.0.1:{free_port()}",
                "--enable-leader-election=false",
                # It asks each Ray head's dashboard for the job's state; from this host, through
                # the API server's proxy rather than cluster DNS, which the host does not use.
                "--use-kubernetes-proxy",
            ],
        )

    # --- teardown helpers -----------------------------------------------------------------------

    def _unmount_kubelet_dirs(self) -> None:
        """Unmount what the kubelet and containerd mounted under the work directory."""
        try:
            mounts = Path("/proc/self/mounts").read_text().splitlines()
        except OSError:
            return
        prefix = str(self.workdir)
        targets = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
        for target in sorted(targets, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def wait_until_ok(process: ServerProcess, url: str, timeout: float, what: str) -> None:
    """Poll a component's health URL until it answers 200; stop at once if the process exits."""
    import urllib.request

    def ok() -> bool:
        process.check_running()
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)

    wait_for(ok, timeout, what, interval=0.5)


def training_operator_objects(host: str, webhook_port: int) -> list[dict[str, Any]]:
    """The Service in front of the webhook (endpoint: this host) and the webhook configuration.

    Names are the ones the Training Operator's certificate rotator looks for.
    """
    service = "training-operator"
    labels = {"kubernetes.io/service-name": service}
    rule = {
        "apiGroups": ["kubeflow.org"],
        "apiVersions": ["v1"],
        "operations": ["CREATE", "UPDATE"],
        "resources": ["pytorchjobs"],
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service, "namespace": CONTROLLERS_NAMESPACE},
            "spec": {"ports": [{"name": "webhook", "port": 443, "targetPort": webhook_port}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{service}-host",
                "namespace": CONTROLLERS_NAMESPACE,
                "labels": labels,
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [host], "conditions": {"ready": True}}],
            "ports": [{"name": "webhook", "port": webhook_port, "protocol": "TCP"}],
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "validator.training-operator.kubeflow.org"},
            "webhooks": [
                {
                    "name": "validator.pytorchjob.training-operator.kubeflow.org",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Fail",
                    "rules": [rule],
                    "clientConfig": {
                        "service": {
                            "name": service,
                            "namespace": CONTROLLERS_NAMESPACE,
                            "path": "/validate-kubeflow-org-v1-pytorchjob",
                            "port": 443,
                        }
                    },
                }
            ],
        },
    ]


def cni_plugin_dir() -> str:
    """Where the CNI plugins are: Debian's containernetworking-plugins, or /opt/cni/bin."""
    for candidate in ("/usr/lib/cni", "/opt/cni/bin"):
        if Path(candidate, "bridge").is_file():
            return candidate
    raise FileNotFoundError("no CNI bridge plugin: apt-get install containernetworking-plugins")
