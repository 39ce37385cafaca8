"""Start the one-node test cluster by hand.

    python -m tests.cluster up      # start it, print the kubeconfig path, run until Ctrl-C
    python -m tests.cluster smoke   # start it, run one pod to completion, tear it down

`make cluster` and `make cluster-smoke` call these. Needs root (containerd, the bridge).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.cluster.node import NodeCluster, controller_dirs
from tests.harness.kube import controlplane_dir


def _cluster(workdir: Path) -> NodeCluster:
    binaries = controlplane_dir()
    if binaries is None:
        sys.exit("no control-plane build: run `bash tests/controlplane/build.sh`")
    return NodeCluster(binaries=binaries, workdir=workdir, controllers=controller_dirs())


def up() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ulmfit-cluster-"))
    started = time.monotonic()
    with _cluster(workdir) as cluster:
        print(f"cluster up in {time.monotonic() - started:.0f}s; logs in {workdir}", flush=True)
        print(f"export KUBECONFIG={cluster.kubeconfig}", flush=True)
        print("Ctrl-C stops it.", flush=True)
        stop = False

        def on_signal(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop:
            time.sleep(0.5)
    return 0


def smoke() -> int:
    from kubernetes import client

    from tests.harness.ports import wait_for

    workdir = Path(tempfile.mkdtemp(prefix="ulmfit-cluster-"))
    started = time.monotonic()
    with _cluster(workdir) as cluster, cluster.api_client() as api:
        core = client.CoreV1Api(api)
        node = core.read_node("ulmfit-node")
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        print(f"node {'Ready' if ready.status == 'True' else 'NotReady'} "
              f"({time.monotonic() - started:.0f}s after start)", flush=True)
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name="smoke"),
            spec=client.V1PodSpec(
                restart_policy="Never",
                containers=[
                    client.V1Container(
                        name="smoke",
                        image=cluster.images["trainer"],
                        image_pull_policy="Never",
                        command=["python", "-c", "print('hello from a pod')"],
                        security_context=client.V1SecurityContext(
                            run_as_non_root=True,
                            run_as_user=65532,
                            allow_privilege_escalation=False,
                        ),
                    )
                ],
            ),
        )
        core.create_namespaced_pod("default", pod)

        def finished() -> str | None:
            phase = core.read_namespaced_pod("smoke", "default").status.phase
            return phase if phase in {"Succeeded", "Failed"} else None

        phase = wait_for(finished, 180, "the smoke pod to finish", interval=1)
        log = core.read_namespaced_pod_log("smoke", "default")
        print(f"pod {phase}: {log.strip()}", flush=True)
        return 0 if phase == "Succeeded" else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "smoke"])
    args = parser.parse_args()
    return up() if args.command == "up" else smoke()


if __name__ == "__main__":
    sys.exit(main())
