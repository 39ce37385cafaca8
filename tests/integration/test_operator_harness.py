"""Shared parts of the operator's integration tests (fixtures and helpers; no tests here).

The real parts: kube-apiserver + etcd (tests.harness.kube), SeaweedFS (tests.harness.s3), our
CRD and the Training Operator's own PyTorchJob CRD (tests.harness.crds). The operator runs as a
subprocess (`python -m ulmfit_operator`) with the least-privilege kubeconfig built from
manifests/rbac, so killing it is a real SIGKILL. Nothing else acts on objects: `Trainer` plays
both the Kubeflow Training Operator (patching PyTorchJob/Job status) and the trainer
(progress.json and the final checkpoint, written with CheckpointStore so the format is the real
one, under the run path of the job instance: `<namespace>/<name>/<uid>`), and
`collect_garbage` plays the garbage collector for a deleted job. These tests play those
controllers to reach failures on demand; tests/e2e/test_cluster_jobs.py runs the same paths
under the real controllers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from ulmfit_operator.api import Metadata, ULMFiTJob
from ulmfit_operator.children import LABEL_JOB, ChildRef
from ulmfit_operator.children.common import config_map_name
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.runtime.kube import Kube, job_ref
from ulmfit_trainer.config import S3Settings, StageConfig
from ulmfit_trainer.records import EvaluationSummary, StageProgress
from ulmfit_trainer.store import CheckpointStore, open_store

from tests.harness.crds import pytorchjob_crd
from tests.harness.kube import (
    ControlPlane,
    apply_manifests,
    least_privilege_kubeconfig,
    load_manifests,
)
from tests.harness.ports import free_port, wait_for
from tests.harness.s3 import SeaweedS3

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = [
    REPO / "manifests" / "crd" / "ulmfit.io_ulmfitjobs.yaml",
]
RBAC_DIR = REPO / "manifests" / "rbac"
CLUSTER_RBAC = [
    RBAC_DIR / "service_account.yaml",
    RBAC_DIR / "cluster_role.yaml",
    RBAC_DIR / "cluster_role_binding.yaml",
    RBAC_DIR / "leader_election_role.yaml",
]
OPERATOR_NAMESPACE = "ulmfit-system"
OPERATOR_ACCOUNT = "ulmfit-operator"
GROUP, VERSION, PLURAL = "ulmfit.io", "v1alpha1", "ulmfitjobs"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- cluster set-up


def _ensure_namespace(kube: Kube, name: str) -> None:
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    with contextlib.suppress(ApiException):
        kube.request("POST", "/api/v1/namespaces", body)


@pytest.fixture(scope="session")
def operator_crds(kube_cluster: ControlPlane) -> None:
    """Our CRD and the test PyTorchJob CRD, installed and served."""
    with kube_cluster.api_client() as api:
        apply_manifests(api, load_manifests([*CRD_FILES, pytorchjob_crd()]))
        kube = Kube(api, OperatorMetrics())

        def served() -> bool:
            for path in (
                "/apis/ulmfit.io/v1alpha1/ulmfitjobs",
                "/apis/kubeflow.org/v1/pytorchjobs",
            ):
                kube.request("GET", path, query=[("limit", "1")])
            return True

        wait_for(served, 60, "the CRDs to be served")


@pytest.fixture(scope="session")
def operator_kubeconfig(kube_cluster: ControlPlane, operator_crds: None) -> Path:
    """A kubeconfig with exactly the rights in manifests/rbac (ClusterRole + Lease Role)."""
    with kube_cluster.api_client() as api:
        _ensure_namespace(Kube(api, OperatorMetrics()), OPERATOR_NAMESPACE)
    return least_privilege_kubeconfig(
        kube_cluster, CLUSTER_RBAC, OPERATOR_NAMESPACE, OPERATOR_ACCOUNT
    )


@pytest.fixture
def admin(kube_cluster: ControlPlane) -> Iterator[Kube]:
    with kube_cluster.api_client() as api:
        yield Kube(api, OperatorMetrics())


# ---------------------------------------------------------------------------- the operator


class OperatorProcess:
    """`python -m ulmfit_operator` in its own process group, its output in a log file."""

    def __init__(
        self,
        kubeconfig: Path,
        env: Mapping[str, str],
        log_path: Path,
        *,
        namespace: str | None,
        lease_namespace: str,
        lease_name: str,
        identity: str,
        resync_seconds: float = 1.0,
        lease_duration: float = 4.0,
        extra_args: tuple[str, ...] = (),
    ):
        self.kubeconfig = kubeconfig
        self.env = dict(env)
        self.log_path = log_path
        self.namespace = namespace
        self.lease_namespace = lease_namespace
        self.lease_name = lease_name
        self.identity = identity
        self.resync_seconds = resync_seconds
        self.lease_duration = lease_duration
        self.extra_args = extra_args
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "ulmfit_operator",
            f"--metrics-port={self.metrics_port}",
            "--metrics-address=127.0.0.1",
            f"--health-port={self.health_port}",
            "--health-address=127.0.0.1",
            f"--resync-seconds={self.resync_seconds}",
            f"--lease-namespace={self.lease_namespace}",
            f"--lease-name={self.lease_name}",
            f"--lease-duration={self.lease_duration}",
            f"--identity={self.identity}",
            "--workers=4",
            "--log-format=json",
        ]
        if self.namespace:
            argv.append(f"--namespace={self.namespace}")
        return argv + list(self.extra_args)

    def start(self) -> OperatorProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBECONFIG"))}
        env.update(self.env)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts} {time.strftime('%H:%M:%S')}\n".encode())
            self.popen = subprocess.Popen(
                self.argv(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
            )
        self.starts += 1
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def _get(self, port: int, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.read().decode()

    def metrics_text(self) -> str:
        return self._get(self.metrics_port, "/metrics")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            match = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if not match or match.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(match.group(3))
        return total

    def healthy(self) -> bool:
        if not self.running:
            raise RuntimeError(f"the operator exited:\n{self.log_tail()}")
        self._get(self.health_port, "/healthz")
        return True

    def leading(self) -> bool:
        return self.healthy() and self.metric("ulmfit_leader") == 1.0

    def wait_leading(self, timeout: float = 90) -> OperatorProcess:
        wait_for(self.leading, timeout, f"operator {self.identity} to lead", interval=0.2)
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up, no lease release."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(15)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture
def start_operator(
    operator_kubeconfig: Path,
    s3_server: SeaweedS3,
    kube_namespace: str,
    admin: Kube,
    tmp_path: Path,
) -> Iterator[Callable[..., OperatorProcess]]:
    """Start operators for this test; all are stopped, and the test's jobs deleted, after it."""
    started: list[OperatorProcess] = []
    logs = tmp_path

    def start(
        *,
        identity: str = "operator-0",
        namespace: str | None = kube_namespace,
        kubeconfig: Path | None = None,
        lease_namespace: str = OPERATOR_NAMESPACE,
        wait: bool = True,
        **kwargs: Any,
    ) -> OperatorProcess:
        process = OperatorProcess(
            kubeconfig or operator_kubeconfig,
            s3_server.env(),
            logs / f"{identity}.log",
            namespace=namespace,
            lease_namespace=lease_namespace,
            lease_name=f"ulmfit-{kube_namespace}"[:63],
            identity=identity,
            **kwargs,
        ).start()
        started.append(process)
        if wait:
            process.wait_leading()
        return process

    yield start
    for process in started:
        process.stop()
    # Jobs of this test must not outlive it: a later cluster-wide operator would pick them up.
    with contextlib.suppress(ApiException):
        for item in admin.request(
            "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{kube_namespace}/{PLURAL}"
        )["items"]:
            admin.delete(job_ref(kube_namespace, item["metadata"]["name"]))
    for process in started:  # shown by pytest only when the test failed
        sys.stderr.write(f"--- {process.identity} log tail\n{process.log_tail(40)}\n")


@pytest.fixture(scope="module")
def shared_operator(
    operator_kubeconfig: Path, s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One cluster-wide operator for a module's short tests (each test uses its own namespace)."""
    logs = tmp_path_factory.mktemp("shared-operator")
    process = OperatorProcess(
        operator_kubeconfig,
        s3_server.env(),
        logs / "operator.log",
        namespace=None,
        lease_namespace=OPERATOR_NAMESPACE,
        lease_name=f"ulmfit-shared-{os.getpid()}-{time.monotonic_ns() % 100000}",
        identity="shared-operator",
    ).start()
    try:
        process.wait_leading()
        yield process
    finally:
        process.stop()
        sys.stderr.write(f"--- shared operator log tail\n{process.log_tail(40)}\n")


@pytest.fixture
def jobs_namespace(kube_namespace: str, admin: Kube) -> Iterator[str]:
    """The test's namespace; its ULMFiTJobs are deleted afterwards."""
    yield kube_namespace
    with contextlib.suppress(ApiException):
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{kube_namespace}/{PLURAL}"
        for item in admin.request("GET", path)["items"]:
            admin.delete(job_ref(kube_namespace, item["metadata"]["name"]))


# ------------------------------------------------------------------------ jobs and children


def job_spec(s3: SeaweedS3, bucket: str, **overrides: Any) -> dict[str, Any]:
    """A small job: the default stages (finetune, classifier, evaluate) on S3."""
    spec: dict[str, Any] = {
        "storage": {
            "s3": {"endpoint": s3.url, "bucket": bucket, "prefix": "runs"},
            "credentialsSecretRef": "s3-credentials",
        },
        "resources": {"cpu": "1", "memory": "1Gi"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def create_job(kube: Kube, namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ULMFiTJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": dict(spec),
    }
    created = kube.create(body)
    assert created is not None, f"ULMFiTJob {namespace}/{name} already exists"
    return created


def get_job(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    return kube.get(job_ref(namespace, name))


def wait_job_gone(
    kube: Kube, namespace: str, name: str, what: str, timeout: float = 30, interval: float = 0.2
) -> None:
    """Until the API server answers 404 for the job (deleted, its finalizers done)."""

    def gone() -> bool:
        try:
            get_job(kube, namespace, name)
        except ApiException as error:
            return error.status == 404
        return False

    wait_for(gone, timeout, what, interval=interval)


def patch_job_spec(kube: Kube, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
    kube.merge_patch(job_ref(namespace, name), {"spec": dict(spec)})


def condition(job: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    for item in (job.get("status") or {}).get("conditions") or []:
        if item["type"] == kind:
            return item  # type: ignore[no-any-return]
    return None


def is_true(job: Mapping[str, Any], kind: str) -> bool:
    found = condition(job, kind)
    return found is not None and found["status"] == "True"


def wait_job(
    kube: Kube,
    namespace: str,
    name: str,
    predicate: Callable[[dict[str, Any]], object],
    what: str,
    timeout: float = 60,
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        job = get_job(kube, namespace, name)
        return job if predicate(job) else None

    return wait_for(check, timeout, f"{namespace}/{name}: {what}", interval=0.2)  # type: ignore[return-value]


def list_children(kube: Kube, namespace: str, job: str | None = None) -> list[dict[str, Any]]:
    selector = f"{LABEL_JOB}={job}" if job else LABEL_JOB
    items = kube.list("kubeflow.org/v1", "pytorchjobs", namespace, selector)
    items += kube.list("batch/v1", "jobs", namespace, selector)
    return sorted(
        items, key=lambda item: item["metadata"]["creationTimestamp"] + item["metadata"]["name"]
    )


def owner_uids(item: Mapping[str, Any]) -> set[str]:
    return {ref.get("uid", "") for ref in item["metadata"].get("ownerReferences") or []}


def wait_child(
    kube: Kube, namespace: str, name: str, timeout: float = 60, owner_uid: str | None = None
) -> dict[str, Any]:
    """The child of that name (owned by the job with `owner_uid`, when given)."""

    def check() -> dict[str, Any] | None:
        for item in list_children(kube, namespace):
            if item["metadata"]["name"] == name and (
                owner_uid is None or owner_uid in owner_uids(item)
            ):
                return item
        return None

    return wait_for(check, timeout, f"child {namespace}/{name}", interval=0.2)  # type: ignore[return-value]


def run_path(job: Mapping[str, Any]) -> str:
    """Where the operator keeps this job instance's objects in the store (`ULMFiTJob.run_id`):
    `<namespace>/<name>/<uid>`."""
    meta = job["metadata"]
    return ULMFiTJob(
        metadata=Metadata(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    ).run_id


def collect_garbage(kube: Kube, namespace: str, name: str, uid: str) -> None:
    """The garbage collector's part after a job is deleted: what the job with that uid owned
    (children, their ConfigMaps, Services) goes; a job of the same name created later owns none
    of it."""
    owned = list_children(kube, namespace, name)
    for plural in ("configmaps", "services"):
        owned += kube.list("v1", plural, namespace, f"{LABEL_JOB}={name}")
    for item in owned:
        if uid in owner_uids(item):
            ref = ChildRef(item["apiVersion"], item["kind"], namespace, item["metadata"]["name"])
            kube.delete(ref)


def events(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    items = kube.request("GET", f"/api/v1/namespaces/{namespace}/events")["items"]
    return [e for e in items if e["involvedObject"].get("name") == name]


class Trainer:
    """Plays the Training Operator (child status) and the trainer (store objects)."""

    def __init__(self, kube: Kube, s3: SeaweedS3, bucket: str, prefix: str = "runs"):
        self.kube = kube
        self.settings = S3Settings(endpoint=s3.url, bucket=bucket, prefix=prefix)
        self.store = open_store(self.settings.root, self.settings)
        self._scratch = Path(tempfile.mkdtemp(prefix="ulmfit-trainer-"))

    def run(self, namespace: str, job: str) -> str:
        """The run path of the job of that name now in the cluster (its uid included)."""
        return run_path(get_job(self.kube, namespace, job))

    def checkpoints(self, namespace: str, job: str, run: str | None = None) -> CheckpointStore:
        """The store of one job instance: `run` if given, else the current job of that name."""
        return CheckpointStore(self.store, run or self.run(namespace, job))

    def config(self, child: Mapping[str, Any]) -> StageConfig:
        """What the operator gave the child's trainer: the stage config in its ConfigMap."""
        meta = child["metadata"]
        path = f"/api/v1/namespaces/{meta['namespace']}/configmaps/{config_map_name(meta['name'])}"
        return StageConfig.model_validate_json(self.kube.request("GET", path)["data"]["stage.json"])

    # -- the Training Operator's part

    @staticmethod
    def ref(child: Mapping[str, Any]) -> ChildRef:
        meta = child["metadata"]
        return ChildRef(child["apiVersion"], child["kind"], meta["namespace"], meta["name"])

    def set_status(self, child: Mapping[str, Any], phase: str, message: str = "") -> None:
        """Running, Succeeded or Failed, written the way each controller writes it."""
        now = now_rfc3339()
        if child["kind"] == "PyTorchJob":
            conditions = [
                {
                    "type": "Created",
                    "status": "True",
                    "reason": "PyTorchJobCreated",
                    "lastTransitionTime": now,
                    "lastUpdateTime": now,
                }
            ]
            if phase in ("Running", "Succeeded", "Failed"):
                conditions.append(
                    {
                        "type": "Running",
                        "status": str(phase == "Running"),
                        "reason": "PyTorchJobRunning",
                        "lastTransitionTime": now,
                        "lastUpdateTime": now,
                    }
                )
            if phase in ("Succeeded", "Failed"):
                conditions.append(
                    {
                        "type": phase,
                        "status": "True",
                        "reason": f"PyTorchJob{phase}",
                        "message": message or f"PyTorchJob {phase.lower()}",
                        "lastTransitionTime": now,
                        "lastUpdateTime": now,
                    }
                )
            status: dict[str, Any] = {"conditions": conditions, "startTime": now}
            if phase in ("Succeeded", "Failed"):
                status["completionTime"] = now
        else:
            current = self.kube.get(self.ref(child)).get("status") or {}
            status = {} if current.get("startTime") else {"startTime": now}
            if phase == "Running":
                status.update({"active": 1, "ready": 1})
            elif phase == "Succeeded":
                reason, text = "CompletionsReached", "Reached expected number of succeeded pods"
                status.update(
                    {
                        "active": None,
                        "ready": 0,
                        "succeeded": 1,
                        "completionTime": now,
                        "conditions": [
                            {
                                "type": "SuccessCriteriaMet",
                                "status": "True",
                                "reason": reason,
                                "message": text,
                                "lastProbeTime": now,
                                "lastTransitionTime": now,
                            },
                            {
                                "type": "Complete",
                                "status": "True",
                                "reason": reason,
                                "message": text,
                                "lastProbeTime": now,
                                "lastTransitionTime": now,
                            },
                        ],
                    }
                )
            elif phase == "Failed":
                reason, text = (
                    "BackoffLimitExceeded",
                    message or "Job has reached the backoff limit",
                )
                status.update(
                    {
                        "active": None,
                        "ready": 0,
                        "failed": 1,
                        "conditions": [
                            {
                                "type": "FailureTarget",
                                "status": "True",
                                "reason": reason,
                                "message": text,
                                "lastProbeTime": now,
                                "lastTransitionTime": now,
                            },
                            {
                                "type": "Failed",
                                "status": "True",
                                "reason": reason,
                                "message": text,
                                "lastProbeTime": now,
                                "lastTransitionTime": now,
                            },
                        ],
                    }
                )
        self.kube.merge_patch(self.ref(child), {"status": status}, sub="status")

    # -- the trainer's part

    def progress(
        self,
        namespace: str,
        job: str,
        stage: str,
        step: int,
        total: int,
        phase: int | None = None,
        phases: int | None = None,
        *,
        run: str | None = None,
    ) -> None:
        record = StageProgress(
            stage=stage,
            state="running",
            step=step,
            total_steps=total,
            loss=2.5,
            tokens_per_second=1000.0,
            phase=phase,
            total_phases=phases,
        )
        self.checkpoints(namespace, job, run).write_progress(stage, record)

    def commit_final(
        self,
        namespace: str,
        job: str,
        stage: str,
        metrics: Mapping[str, float],
        *,
        run: str | None = None,
        **meta: Any,
    ) -> str:
        directory = self._scratch / f"{namespace}-{job}-{stage}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "weights.bin").write_bytes(os.urandom(64))
        checkpoint = self.checkpoints(namespace, job, run).save(
            stage,
            "final",
            directory,
            meta={"metrics": dict(metrics), **meta},
            final=True,
            step=100,
        )
        return checkpoint.uri

    def complete(
        self, child: Mapping[str, Any], metrics: Mapping[str, float] | None = None, **meta: Any
    ) -> str:
        """Run a stage to its end: Running, progress, final checkpoint, Succeeded. The store
        objects go where the child's stage config says (`run`), as the real trainer's do; and,
        as the real one does, a stage whose final checkpoint is already there (in that run)
        exits at once: Succeeded, no new checkpoint."""
        labels = child["metadata"]["labels"]
        namespace = child["metadata"]["namespace"]
        job, stage = labels[LABEL_JOB], labels["ulmfit.io/stage"]
        run = self.config(child).run
        self.set_status(child, "Running")
        finished = self.checkpoints(namespace, job, run).final(stage)
        if finished is not None:  # "stage ... already finished"
            self.set_status(child, "Succeeded")
            return finished.uri
        self.progress(namespace, job, stage, 100, 100, run=run)
        uri = self.commit_final(namespace, job, stage, metrics or {"loss": 1.25}, run=run, **meta)
        self.set_status(child, "Succeeded")
        return uri


@pytest.fixture
def trainer(
    admin: Kube, s3_server: SeaweedS3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> Trainer:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return Trainer(admin, s3_server, s3_bucket)


def evaluation_metrics(accuracy: float, majority_baseline: float) -> dict[str, Any]:
    """Metrics as the real evaluate stage records them (its `EvaluationSummary`)."""
    return EvaluationSummary(
        accuracy=accuracy,
        macro_f1=accuracy,
        majority_baseline_accuracy=majority_baseline,
        expected_calibration_error=0.05,
        test_examples=40.0,
    ).to_wire()


def run_to_success(
    kube: Kube, trainer: Trainer, namespace: str, name: str, timeout: float = 60
) -> dict[str, Any]:
    """Play every stage of a default job (finetune, classifier, evaluate) to the end."""
    for stage in ("finetune", "classifier", "evaluate"):
        child = wait_child(kube, namespace, f"{name}-{stage}-a1", timeout=timeout)
        metrics = evaluation_metrics(0.75, 0.25) if stage == "evaluate" else None
        trainer.complete(child, metrics)
    return wait_job(
        kube, namespace, name, lambda j: is_true(j, "Succeeded"), "Succeeded", timeout=timeout
    )
