"""The test cluster's network: one Linux bridge with no route or masquerade beyond this machine.

Pods get addresses from ``POD_CIDR`` on the bridge ``BRIDGE``; the host side of the bridge holds
``HOST_IP``, where every server that pods must reach listens (kube-apiserver, CoreDNS, the S3
server). Service ClusterIPs come from ``SERVICE_CIDR`` and exist only as kube-proxy's DNAT rules.

Pods have no default route (their only routes are the pod and Service ranges), nothing is
masqueraded, and a FORWARD rule in our own chain drops anything from the pod range that is not
for the pod or Service range: a pod cannot send a packet anywhere but this cluster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

BRIDGE = "ulmfit0"
POD_CIDR = "10.88.0.0/16"
HOST_IP = "10.88.0.1"
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
GUARD_CHAIN = "ULMFIT-TEST-GUARD"
NETWORK_NAME = "ulmfit-test"  # the CNI network; host-local keeps its leases under this name


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def _sysctl(key: str, value: str) -> None:
    Path("/proc/sys", *key.split(".")).write_text(value)


def bridge_up() -> None:
    """Create the bridge with the host address (idempotent), and the forwarding guard."""
    if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
    prefix = POD_CIDR.split("/")[1]
    addresses = _run("ip", "-o", "-4", "addr", "show", "dev", BRIDGE).stdout
    if f" {HOST_IP}/" not in addresses:
        _run("ip", "addr", "add", f"{HOST_IP}/{prefix}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    # Pod to Service to pod is routed back out of the same bridge, and bridged packets must pass
    # through iptables for kube-proxy's DNAT; the guard below keeps forwarding inside the cluster.
    if not Path("/proc/sys/net/bridge").is_dir() and shutil.which("modprobe"):
        _run("modprobe", "br_netfilter", check=False)
    _sysctl("net.bridge.bridge-nf-call-iptables", "1")
    _sysctl("net.ipv4.ip_forward", "1")
    _install_guard()


def _install_guard() -> None:
    if _run("iptables", "-w", "-L", GUARD_CHAIN, "-n", check=False).returncode != 0:
        _run("iptables", "-w", "-N", GUARD_CHAIN)
    _run("iptables", "-w", "-F", GUARD_CHAIN)
    for allowed in (POD_CIDR, SERVICE_CIDR):
        _run("iptables", "-w", "-A", GUARD_CHAIN, "-d", allowed, "-j", "RETURN")
    _run("iptables", "-w", "-A", GUARD_CHAIN, "-j", "DROP")
    jump = ("FORWARD", "-s", POD_CIDR, "-j", GUARD_CHAIN)
    if _run("iptables", "-w", "-C", *jump, check=False).returncode != 0:
        _run("iptables", "-w", "-I", *jump)


def bridge_down() -> None:
    """Remove the bridge and the guard; forwarding goes back off."""
    jump = ("FORWARD", "-s", POD_CIDR, "-j", GUARD_CHAIN)
    while _run("iptables", "-w", "-C", *jump, check=False).returncode == 0:
        _run("iptables", "-w", "-D", *jump, check=False)
    _run("iptables", "-w", "-F", GUARD_CHAIN, check=False)
    _run("iptables", "-w", "-X", GUARD_CHAIN, check=False)
    _run("ip", "link", "del", BRIDGE, check=False)
    _sysctl("net.ipv4.ip_forward", "0")


def cni_config() -> str:
    """The CNI network list containerd gives each pod: bridge + host-local, no default route."""
    network = {
        "cniVersion": "0.4.0",
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR, "gateway": HOST_IP}]],
                    # The pod range is on-link; Services go through the host (kube-proxy).
                    "routes": [{"dst": SERVICE_CIDR}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return json.dumps(network, indent=2)
