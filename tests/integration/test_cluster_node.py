"""The one-node test cluster itself: a pod runs, DNS resolves, the network stays inside, and the
real Kubeflow webhook is in the admission path. Nothing here plays a controller."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster import network
from tests.harness.ports import wait_for

pytestmark = pytest.mark.timeout(600)


def python_pod(
    node_cluster: Any,
    name: str,
    script: str,
    labels: dict[str, str] | None = None,
    port: tuple[str, int] | None = None,
) -> Any:
    """A pod running `python -c script` in the trainer image as the non-root user, with a
    read-only root filesystem and a writable /tmp; `port`: a named container port."""
    from kubernetes import client

    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(
            restart_policy="Never",
            automount_service_account_token=False,
            containers=[
                client.V1Container(
                    name="main",
                    image=node_cluster.images["trainer"],
                    image_pull_policy="Never",
                    command=["python", "-c", script],
                    ports=[client.V1ContainerPort(name=port[0], container_port=port[1])]
                    if port
                    else None,
                    volume_mounts=[client.V1VolumeMount(name="tmp", mount_path="/tmp")],
                    security_context=client.V1SecurityContext(
                        run_as_non_root=True,
                        run_as_user=65532,
                        allow_privilege_escalation=False,
                        read_only_root_filesystem=True,
                        capabilities=client.V1Capabilities(drop=["ALL"]),
                    ),
                )
            ],
            volumes=[client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource())],
        ),
    )


def run_pod(node_cluster: Any, namespace: str, name: str, script: str) -> tuple[str, str]:
    """Run `python_pod` to its end; (phase, log)."""
    from kubernetes import client

    pod = python_pod(node_cluster, name, script)
    with node_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(namespace, pod)

        def finished() -> str | None:
            phase = core.read_namespaced_pod(name, namespace).status.phase
            return phase if phase in {"Succeeded", "Failed"} else None

        phase = wait_for(finished, 300, f"pod {name} to finish", interval=1)
        return phase, core.read_namespaced_pod_log(name, namespace)


def test_node_is_ready_and_a_pod_runs_to_completion(node_cluster: Any, node_namespace: str):
    """The kubelet registered the node on the bridge address, and a pod of the trainer image
    runs as the non-root user with a read-only root filesystem."""
    from kubernetes import client

    with node_cluster.api_client() as api:
        node = client.CoreV1Api(api).read_node("ulmfit-node")
    ready = {c.type: c.status for c in node.status.conditions}
    assert ready["Ready"] == "True"
    assert {a.address for a in node.status.addresses if a.type == "InternalIP"} == {network.HOST_IP}
    phase, log = run_pod(
        node_cluster, node_namespace, "hello", "import os, torch; print('uid', os.getuid())"
    )
    assert (phase, log.strip()) == ("Succeeded", "uid 65532")


def test_pods_resolve_services_and_have_no_route_beyond_the_cluster(
    node_cluster: Any, node_namespace: str
):
    """CoreDNS answers cluster names (the `kubernetes` Service) and nothing else; a pod's only
    routes are the pod and Service ranges. Read from the pod itself; no packet is sent to any
    address outside the cluster."""
    script = """
import json, socket
answer = {"kubernetes": socket.gethostbyname("kubernetes.default.svc.cluster.local")}
try:
    socket.getaddrinfo("example.com", 80)
    answer["outside"] = "resolved"
except OSError:
    answer["outside"] = "unresolved"
routes = []
for line in open("/proc/net/route").read().splitlines()[1:]:
    fields = line.split()
    dst = socket.inet_ntoa(bytes.fromhex(fields[1])[::-1])
    mask = socket.inet_ntoa(bytes.fromhex(fields[7])[::-1])
    routes.append(f"{dst}/{mask}")
answer["routes"] = routes
print(json.dumps(answer))
"""
    phase, log = run_pod(node_cluster, node_namespace, "dns", script)
    assert phase == "Succeeded", log
    answer = json.loads(log.strip().splitlines()[-1])
    assert answer["kubernetes"] == node_cluster.service_ip
    assert answer["outside"] == "unresolved"  # CoreDNS has no forwarder
    assert "0.0.0.0/0.0.0.0" not in answer["routes"], answer["routes"]
    assert set(answer["routes"]) == {"10.88.0.0/255.255.0.0", "10.96.0.0/255.255.0.0"}


def test_the_real_kubeflow_webhook_rejects_an_invalid_pytorchjob(
    node_cluster: Any, node_namespace: str
):
    """The Training Operator's own validation runs at admission (its webhook, its certificate
    from its rotator): a PyTorchJob without a container named `pytorch` is refused."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    body = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "no-pytorch-container"},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "template": {"spec": {"containers": [{"name": "other", "image": "x"}]}},
                }
            }
        },
    }
    with node_cluster.api_client() as api, pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "kubeflow.org", "v1", node_namespace, "pytorchjobs", body
        )
    assert refused.value.status in {400, 403, 422}
    assert "validator.pytorchjob.training-operator.kubeflow.org" in str(refused.value.body)


def test_a_loopback_server_answers_port_forward_and_no_other_pod(
    node_cluster: Any, node_namespace: str, kubectl: Any
):
    """What the tune pod's Ray dashboard relies on: bound to the pod's loopback, it answers
    `kubectl port-forward` of its Service (which connects inside the pod), and a connection from
    another pod to the pod's address is refused."""
    import os
    import subprocess
    import urllib.request

    from kubernetes import client

    from tests.harness.ports import free_port

    serve = (
        "import http.server, os; os.chdir('/tmp'); open('index.html', 'w').write('inside');"
        "http.server.HTTPServer(('127.0.0.1', 8265), http.server.SimpleHTTPRequestHandler)"
        ".serve_forever()"
    )
    labels = {"app": "loopback"}
    server = python_pod(node_cluster, "loopback", serve, labels, port=("dashboard", 8265))
    service = client.V1Service(
        metadata=client.V1ObjectMeta(name="loopback"),
        spec=client.V1ServiceSpec(
            selector=labels,
            ports=[client.V1ServicePort(name="dashboard", port=8265, target_port="dashboard")],
        ),
    )
    with node_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_pod(node_namespace, server)
        core.create_namespaced_service(node_namespace, service)

        def running() -> str | None:
            pod = core.read_namespaced_pod("loopback", node_namespace)
            return pod.status.pod_ip if pod.status.phase == "Running" else None

        address = wait_for(running, 120, "the loopback server pod", interval=1)

    probe = f"""
import socket, time
time.sleep(3)  # the server's start-up
try:
    socket.create_connection(({address!r}, 8265), timeout=5).close()
    print("connected")
except OSError as error:
    print("refused" if isinstance(error, ConnectionRefusedError) else f"error {{error}}")
"""
    phase, log = run_pod(node_cluster, node_namespace, "prober", probe)
    assert (phase, log.strip()) == ("Succeeded", "refused"), log

    port = free_port()
    forward = subprocess.Popen(
        [str(kubectl.path), "port-forward", "-n", node_namespace, "svc/loopback",
         f"{port}:8265", "--address", "127.0.0.1"],
        env={**os.environ, **kubectl.env, "KUBECONFIG": str(node_cluster.kubeconfig)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:

        def fetch() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
                return str(answer.read().decode())

        assert wait_for(fetch, 60, "the loopback server through port-forward", interval=1) == (
            "inside"
        )
    finally:
        forward.terminate()
        forward.wait(10)
