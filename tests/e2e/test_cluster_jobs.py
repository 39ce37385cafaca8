"""ULMFiTJobs on a real one-node cluster: nothing here plays a controller.

The operator runs as a pod installed by `helm install`; its children are handled by the real
Kubeflow Trainer v2 and JobSet (TrainJobs: what `auto` picks here, where both backends are
served), Kubeflow Training Operator (PyTorchJobs, where a test names that backend), KubeRay
operator, Job controller, scheduler, kubelet and garbage collector; trainer pods run the
project's trainer image and write to a real S3 server on the cluster's bridge. Each job is tiny
(a 2-layer, 32-wide model and a few hundred documents), so a whole pipeline takes minutes on 2
cores.

The tests run in file order; the last one uninstalls the operator.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ulmfit_operator.api import Metadata, ULMFiTJob
from ulmfit_trainer.records import CheckpointRecord, parse_checkpoint_record

from tests.harness.cluster import ClusterOperator
from tests.harness.kueue import node_kueue  # noqa: F401 - fixture
from tests.harness.ports import free_port, wait_for
from tests.harness.s3 import SeaweedS3
from tests.harness.tools import Tool

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "ulmfit.io", "v1alpha1", "ulmfitjobs"
JOB_TIMEOUT = 900.0


# --- helpers --------------------------------------------------------------------------------------


def tiny_job(
    name: str, operator: ClusterOperator, s3: SeaweedS3, bucket: str, **overrides: Any
) -> dict[str, Any]:
    """A ULMFiTJob small enough for a 2-core machine: every stage a handful of steps."""
    spec: dict[str, Any] = {
        "data": {
            "maxTrainExamples": 240,
            "maxUnlabeledExamples": 400,
            "maxEvalExamples": 120,
            "maxLength": 32,
        },
        "model": {"architecture": {"layers": 2, "hiddenSize": 32, "heads": 2, "contextLength": 32}},
        "tokenizer": {"vocabSize": 600},
        "stages": {
            "pretrain": {"maxSteps": 6, "batchSize": 8, "checkpointEvery": 3},
            "finetune": {"maxSteps": 6, "batchSize": 8, "checkpointEvery": 3},
            "classifier": {
                "unfreezePhases": 2,
                "epochsPerPhase": 0.25,
                "finalEpochs": 0.25,
                "batchSize": 16,
            },
        },
        "resources": {
            "workers": 1,
            "processesPerWorker": 1,
            "cpu": "500m",
            "memory": "2Gi",
            "image": operator.trainer_image,
            # A TrainJob takes its pull policy from the runtime (IfNotPresent); the image is
            # on the node, and its registry is this host's loopback.
            "imagePullPolicy": "IfNotPresent",
        },
        "storage": {
            "s3": {"endpoint": s3.url, "bucket": bucket, "prefix": "runs"},
            "credentialsSecretRef": "s3-credentials",
            "progressIntervalSeconds": 1,
        },
        "seed": 7,
    }
    for path, value in overrides.items():
        target = spec
        *parents, leaf = path.split(".")
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = value
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ULMFiTJob",
        "metadata": {"name": name},
        "spec": spec,
    }


class Cluster:
    """What a test does to the cluster, through kubectl and the API as a user would."""

    def __init__(self, node_cluster: Any, kubectl: Tool, namespace: str) -> None:
        self.node = node_cluster
        self.kubectl = kubectl
        self.namespace = namespace
        self.kubeconfig = str(node_cluster.kubeconfig)

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        result = self.kubectl.run(
            *args, "-n", self.namespace, kubeconfig=self.kubeconfig, check=check, timeout=timeout
        )
        return result.stdout

    def apply(self, obj: dict[str, Any], tmp_path: Path) -> None:
        path = tmp_path / f"{obj['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(obj))
        self.run("apply", "-f", str(path))

    def s3_secret(self, s3: SeaweedS3) -> None:
        self.run(
            "create", "secret", "generic", "s3-credentials",
            f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
        )  # fmt: skip

    def get(self, kind: str, name: str | None = None, selector: str | None = None) -> Any:
        args = ["get", kind, "-o", "json"]
        if name:
            args.insert(2, name)
        if selector:
            args += ["-l", selector]
        return json.loads(self.run(*args))

    def job(self, name: str) -> dict[str, Any]:
        return dict(self.get("ulmfitjob", name))

    def store_run(self, name: str) -> str:
        """The job's run path in the store, `<namespace>/<name>/<uid>` (`ULMFiTJob.run_id`)."""
        uid = self.job(name)["metadata"]["uid"]
        return ULMFiTJob(metadata=Metadata(name=name, namespace=self.namespace, uid=uid)).run_id

    def wait_finished(self, name: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        """The job once its Succeeded or Failed condition is True; fails with its status."""

        def finished() -> dict[str, Any] | None:
            job = self.job(name)
            for condition in job.get("status", {}).get("conditions") or []:
                if condition["type"] in {"Succeeded", "Failed"} and condition["status"] == "True":
                    return job
            return None

        try:
            return wait_for(finished, timeout, f"ULMFiTJob {name} to finish", interval=3)
        except TimeoutError:
            raise AssertionError(self.describe(name)) from None

    def wait_stage(self, name: str, stage: str, states: set[str], timeout: float = 600) -> Any:
        def reached() -> dict[str, Any] | None:
            for entry in self.job(name).get("status", {}).get("stages") or []:
                if entry["name"] == stage and entry["state"] in states:
                    return dict(entry)
            return None

        try:
            return wait_for(reached, timeout, f"stage {stage} of {name} in {states}", interval=2)
        except TimeoutError:
            raise AssertionError(self.describe(name)) from None

    def describe(self, name: str) -> str:
        """Everything useful when a job does not do what a test expects."""
        parts = [json.dumps(self.job(name).get("status", {}), indent=1)[:6000]]
        parts.append(
            self.run("get", "pods,trainjobs,jobsets,pytorchjobs,jobs,rayjobs", "-o", "wide",
                     check=False)
        )  # fmt: skip
        parts.append(self.run("get", "events", "--sort-by=.lastTimestamp", check=False)[-6000:])
        for pod in self.get("pods")["items"]:
            pod_name = pod["metadata"]["name"]
            log = self.run("logs", pod_name, "--all-containers", "--tail=30", check=False)
            parts.append(f"--- {pod_name}\n{log}")
        return "\n".join(parts)


def stages_by_name(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in job["status"]["stages"]}


def true_conditions(item: dict[str, Any]) -> set[str]:
    return {c["type"] for c in (item.get("status") or {}).get("conditions") or []
            if c["status"] == "True"}  # fmt: skip


PYTORCHJOB = {"resources.trainingBackend": "pytorchjob"}
"""What a test that is about the PyTorchJob backend adds to its job (auto picks TrainJob here)."""


@pytest.fixture
def cluster(
    node_cluster: Any, kubectl: Tool, node_namespace: str, cluster_s3: SeaweedS3
) -> Cluster:
    target = Cluster(node_cluster, kubectl, node_namespace)
    target.s3_secret(cluster_s3)
    return target


@pytest.fixture
def bucket(cluster_s3: SeaweedS3) -> Iterator[str]:
    name = cluster_s3.make_bucket()
    yield name


# --- 1: the whole pipeline ------------------------------------------------------------------------


def test_job_runs_every_stage_as_pods_and_the_model_predicts_from_s3(
    cluster: Cluster,
    cluster_operator: ClusterOperator,
    cluster_s3: SeaweedS3,
    bucket: str,
    tmp_path: Path,
) -> None:
    """`kubectl apply` of a job: pretrain, finetune, classifier and evaluate run as real pods
    (TrainJobs under the real Kubeflow Trainer v2 and JobSet, which `auto` picks where both
    backends are served; evaluate as a batch Job), the job ends Succeeded with test metrics, and
    `ulmfit predict` loads the exported model from S3."""
    job = tiny_job("pipeline", cluster_operator, cluster_s3, bucket)
    job["spec"]["stages"]["pretrain"]["enabled"] = True
    cluster.apply(job, tmp_path)

    finished = cluster.wait_finished("pipeline")
    conditions = {c["type"]: c for c in finished["status"]["conditions"]}
    assert conditions["Succeeded"]["status"] == "True", cluster.describe("pipeline")
    stages = stages_by_name(finished)
    assert set(stages) == {"pretrain", "finetune", "classifier", "evaluate"}
    assert all(entry["state"] == "Succeeded" for entry in stages.values())
    result = finished["status"]["result"]
    metrics = result["testMetrics"]
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert 0.0 <= metrics["macroF1"] <= 1.0
    # What the real evaluate stage wrote reaches the status under its own name.
    assert 0.0 < metrics["majorityBaselineAccuracy"] < 1.0
    # ... and the operator's summary reads it (it once looked for a key nobody wrote).
    baseline = f"majority baseline {metrics['majorityBaselineAccuracy']:.4f}"
    assert baseline in conditions["Succeeded"]["message"], conditions["Succeeded"]

    # Each training stage ran as a TrainJob that Trainer and JobSet drove to Complete, through a
    # JobSet of its own, and its pod really ran to the end (the kubelet reported its exit). No
    # PyTorchJob was made.
    for stage in ("pretrain", "finetune", "classifier"):
        child = stages[stage]["child"]
        trainjob = cluster.get("trainjob", child)
        assert "Complete" in true_conditions(trainjob), trainjob["status"]
        assert trainjob["spec"]["runtimeRef"]["name"] == "ulmfit-torch"
        jobset = cluster.get("jobset", child)
        assert "Completed" in true_conditions(jobset), jobset["status"]
        pods = cluster.get("pods", selector=f"jobset.sigs.k8s.io/jobset-name={child}")["items"]
        assert [p["status"]["phase"] for p in pods] == ["Succeeded"], pods
        assert pods[0]["metadata"]["labels"]["ulmfit.io/stage"] == stage
    assert cluster.get("pytorchjobs", selector="ulmfit.io/job=pipeline")["items"] == []
    evaluate = cluster.get("pods", selector=f"job-name={stages['evaluate']['child']}")
    phases = {pod["status"]["phase"] for pod in evaluate["items"]}
    assert phases == {"Succeeded"}

    # The model is in S3, and predict loads it from there.
    model_uri = result["modelUri"]
    assert model_uri.startswith(f"s3://{bucket}/")
    env = {**os.environ, **cluster_s3.env()}
    predicted = subprocess.run(
        [sys.executable, "-m", "ulmfit_operator.cli", "predict", model_uri,
         "library for parsing XML documents", "--s3-endpoint", cluster_s3.url],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    line = json.loads(predicted.stdout.strip().splitlines()[-1])
    assert line["label"] in line["probabilities"]
    assert abs(sum(line["probabilities"].values()) - 1.0) < 1e-4


# --- 2: two pods, one torchrun rendezvous ---------------------------------------------------------


def test_two_worker_stage_matches_one_pod_run_on_both_backends(
    cluster: Cluster,
    cluster_operator: ClusterOperator,
    cluster_s3: SeaweedS3,
    bucket: str,
    tmp_path: Path,
) -> None:
    """`workers: 2` runs the pretrain stage in two pods, one process each, on either backend:
    the environment the real controller gives them drives torchrun's rendezvous across the pods
    (the Training Operator's MASTER_ADDR on a headless Service, RANK, WORLD_SIZE; Trainer v2's
    PET_* variables, the master at `<trainjob>-node-0-0.<trainjob>`). The same steps in one pod
    reach the same validation loss: each of the two ranks takes half of the one-pod batch (the
    data order deals one permutation round-robin), and the gradients are averaged, so only float
    summation order differs. Tolerance: 1% relative."""
    common = {
        "stages.pretrain.enabled": True,
        "stages.pretrain.maxSteps": 8,
        "stages.pretrain.checkpointEvery": 100,
        "model.architecture.dropout": 0.0,
    }
    two = tiny_job("two-pods", cluster_operator, cluster_s3, bucket, **common, **PYTORCHJOB,
                   **{"resources.workers": 2, "stages.pretrain.batchSize": 4})  # fmt: skip
    one = tiny_job("one-pod", cluster_operator, cluster_s3, bucket, **common, **PYTORCHJOB,
                   **{"resources.workers": 1, "stages.pretrain.batchSize": 8})  # fmt: skip
    cluster.apply(two, tmp_path)
    cluster.apply(one, tmp_path)

    def running_pods(job: str) -> list[dict[str, Any]]:
        pods = cluster.get("pods", selector=f"ulmfit.io/job={job},ulmfit.io/stage=pretrain")
        return [p for p in pods["items"] if p["status"]["phase"] == "Running"]

    def env_of(pod: dict[str, Any]) -> dict[str, Any]:
        return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}

    # Both pods of the two-worker stage run at once, with the rendezvous environment the real
    # controller gave them. (Once the master exits the controller marks the PyTorchJob succeeded
    # and deletes a worker still running, per cleanPodPolicy, so look while they run.)
    def both_running() -> dict[str, dict[str, Any]] | None:
        running = {
            p["metadata"]["labels"]["training.kubeflow.org/replica-type"]: p
            for p in running_pods("two-pods")
        }
        return running if set(running) == {"master", "worker"} else None

    pods = wait_for(both_running, 300, "the master and worker pods to run at once", interval=0.5)
    worker_env = env_of(pods["worker"])
    child = pods["master"]["metadata"]["labels"]["training.kubeflow.org/job-name"]
    assert worker_env["MASTER_ADDR"] == f"{child}-master-0"
    assert (worker_env["RANK"], worker_env["WORLD_SIZE"]) == ("1", "2")

    two_stage = cluster.wait_stage("two-pods", "pretrain", {"Succeeded", "Failed"})
    one_stage = cluster.wait_stage("one-pod", "pretrain", {"Succeeded", "Failed"})
    assert two_stage["state"] == "Succeeded", cluster.describe("two-pods")
    assert one_stage["state"] == "Succeeded", cluster.describe("one-pod")
    one_loss = one_stage["metrics"]["validLoss"]
    two_loss = two_stage["metrics"]["validLoss"]
    assert abs(two_loss - one_loss) <= 0.01 * one_loss, (two_loss, one_loss)

    # The same two-pod stage as a TrainJob: JobSet runs both pods of its one Job at once, and
    # each has Trainer's rendezvous environment, its rank from the pod's completion index.
    trainjob = tiny_job("two-trainjob", cluster_operator, cluster_s3, bucket, **common,
                        **{"resources.workers": 2, "stages.pretrain.batchSize": 4})  # fmt: skip
    cluster.apply(trainjob, tmp_path)

    def both_trainjob_pods() -> list[dict[str, Any]] | None:
        running = running_pods("two-trainjob")
        return running if len(running) == 2 else None

    pods_now = wait_for(both_trainjob_pods, 300, "both TrainJob pods to run at once", interval=0.5)
    child = pods_now[0]["metadata"]["labels"]["jobset.sigs.k8s.io/jobset-name"]
    for pod in pods_now:
        env = env_of(pod)
        assert env["PET_MASTER_ADDR"] == f"{child}-node-0-0.{child}", env
        assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) == ("2", "1"), env
        assert "MASTER_ADDR" not in env and "RANK" not in env, env
    ranks = {pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
             for pod in pods_now}  # fmt: skip
    assert ranks == {"0", "1"}
    trainjob_stage = cluster.wait_stage("two-trainjob", "pretrain", {"Succeeded", "Failed"})
    assert trainjob_stage["state"] == "Succeeded", cluster.describe("two-trainjob")
    trainjob_loss = trainjob_stage["metrics"]["validLoss"]
    assert abs(trainjob_loss - one_loss) <= 0.01 * one_loss, (trainjob_loss, one_loss)
    for name in ("two-pods", "one-pod", "two-trainjob"):
        cluster.run("delete", "ulmfitjob", name, "--wait=false")


# --- 3: a trainer pod deleted mid-stage -----------------------------------------------------------


def committed_steps(s3: SeaweedS3, bucket: str, run: str, stage: str) -> list[int]:
    """Steps of the stage's committed checkpoints in the job's `run` path (`Cluster.store_run`;
    a `meta.json` is written last)."""
    prefix = f"runs/{run}/{stage}/"
    steps = []
    for item in s3.minio().list_objects(bucket, prefix=prefix, recursive=True):
        parts = item.object_name[len(prefix):].split("/")
        if len(parts) == 2 and parts[1] == "meta.json" and parts[0].startswith("step-"):
            steps.append(int(parts[0].removeprefix("step-")))
    return sorted(steps)


def final_record(s3: SeaweedS3, bucket: str, run: str, stage: str) -> CheckpointRecord:
    """The commit record (`meta.json`) of the stage's final checkpoint in the job's `run`."""
    response = s3.minio().get_object(bucket, f"runs/{run}/{stage}/final/meta.json")
    try:
        return parse_checkpoint_record(response.read())
    finally:
        response.close()
        response.release_conn()


class ChildWatch:
    """Samples a job's training children (TrainJobs and PyTorchJobs) in the background: per
    stage, the most ever active at once."""

    def __init__(self, cluster: Cluster, job: str) -> None:
        self.cluster, self.job = cluster, job
        self.most_active: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChildWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        selector = f"ulmfit.io/job={self.job}"
        while not self._stop.wait(0.5):
            try:
                items = self.cluster.get("trainjobs,pytorchjobs", selector=selector)["items"]
            except Exception:
                continue
            active: dict[str, int] = {}
            for item in items:
                if not true_conditions(item) & {"Succeeded", "Complete", "Failed"}:
                    stage = item["metadata"]["labels"]["ulmfit.io/stage"]
                    active[stage] = active.get(stage, 0) + 1
            for stage, count in active.items():
                self.most_active[stage] = max(self.most_active.get(stage, 0), count)


@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_deleted_trainer_pod_fails_the_attempt_and_the_next_resumes(
    cluster: Cluster,
    cluster_operator: ClusterOperator,
    cluster_s3: SeaweedS3,
    bucket: str,
    tmp_path: Path,
    backend: str,
) -> None:
    """Deleting the running trainer pod fails that attempt (the real controller marks the
    TrainJob or PyTorchJob Failed); the operator starts attempt 2, whose trainer resumes from
    the last committed checkpoint, and the job succeeds. Never are two attempts of a stage
    active."""
    job = tiny_job("resume", cluster_operator, cluster_s3, bucket, **{
        "stages.finetune.maxSteps": 400,
        "stages.finetune.checkpointEvery": 10,
        "runPolicy.backoffLimit": 2,
        "resources.trainingBackend": backend,
    })  # fmt: skip
    kind = backend  # the backend's name is its kind's, in lower case
    with ChildWatch(cluster, "resume") as watch:
        cluster.apply(job, tmp_path)
        run = cluster.store_run("resume")
        first = cluster.wait_stage("resume", "finetune", {"Running"})
        child = first["child"]
        wait_for(
            lambda: committed_steps(cluster_s3, bucket, run, "finetune"),
            300, "a committed finetune checkpoint", interval=0.3,
        )  # fmt: skip
        attempt_one = "ulmfit.io/job=resume,ulmfit.io/stage=finetune,ulmfit.io/attempt=1"
        [pod] = cluster.get("pods", selector=attempt_one)["items"]
        cluster.run("delete", "pod", pod["metadata"]["name"], "--wait=false")
        steps_before = committed_steps(cluster_s3, bucket, run, "finetune")

        finished = cluster.wait_finished("resume")
    assert finished["status"]["conditions"], finished
    conditions = {c["type"]: c["status"] for c in finished["status"]["conditions"]}
    assert conditions.get("Succeeded") == "True", cluster.describe("resume")
    finetune = stages_by_name(finished)["finetune"]
    assert finetune["attempts"] == 2, finetune
    assert finetune["child"].endswith("-a2"), finetune
    assert "Failed" in true_conditions(cluster.get(kind, child))
    assert cluster.get(kind, finetune["child"])["kind"].lower() == kind
    log = cluster.run(
        "logs", "-l", "ulmfit.io/job=resume,ulmfit.io/stage=finetune,ulmfit.io/attempt=2",
        "--tail=-1",
    )  # fmt: skip
    resumed = [int(step) for step in re.findall(r"resumed at step (\d+)", log)]
    assert resumed and resumed[0] >= min(steps_before), log[-2000:]
    assert max(watch.most_active.values()) == 1, watch.most_active
    cluster.run("delete", "ulmfitjob", "resume", "--wait=true", timeout=180)


# --- 3b: pods that never start -------------------------------------------------------------------


def test_pods_that_cannot_start_fail_the_job_with_the_kubelets_own_reason(
    cluster: Cluster,
    cluster_operator: ClusterOperator,
    cluster_s3: SeaweedS3,
    bucket: str,
    tmp_path: Path,
) -> None:
    """An image the node does not have (and may not pull) leaves the trainer pod waiting in
    ErrImageNeverPull: the real kubelet's reason. After pendingDeadlineSeconds the operator
    stops the attempt, and with no retries left the job fails with that reason in its Failed
    condition and a Warning event."""
    repository = cluster_operator.trainer_image.rpartition(":")[0]
    job = tiny_job("unpulled", cluster_operator, cluster_s3, bucket, **PYTORCHJOB, **{
        "resources.image": f"{repository}:not-on-this-node",
        "resources.imagePullPolicy": "Never",
        "runPolicy.pendingDeadlineSeconds": 30,
        "runPolicy.backoffLimit": 0,
    })  # fmt: skip
    cluster.apply(job, tmp_path)
    finished = cluster.wait_finished("unpulled", timeout=300)
    conditions = {c["type"]: c for c in finished["status"]["conditions"]}
    failed = conditions.get("Failed")
    assert failed is not None and failed["status"] == "True", cluster.describe("unpulled")
    assert failed["reason"] == "BackoffLimitExceeded", failed
    assert "PendingDeadlineExceeded: pod " in failed["message"], failed
    assert "ErrImageNeverPull" in failed["message"], failed
    events = cluster.get("events")["items"]
    reasons = {
        e["reason"] for e in events if e["involvedObject"].get("name") == "unpulled"
    }
    assert "PendingDeadlineExceeded" in reasons, reasons
    [entry] = [e for e in finished["status"]["stages"] if e.get("child")]
    child = cluster.get("pytorchjob", entry["child"])
    stopped = child["metadata"]["annotations"]["ulmfit.io/stopped"]
    assert stopped.startswith("PendingDeadlineExceeded"), stopped


# --- 3c: a queued job under the real Kueue ------------------------------------------------------


@pytest.mark.usefixtures("node_kueue")
@pytest.mark.parametrize("backend", ["trainjob", "pytorchjob"])
def test_queued_job_runs_every_stage_as_kueue_admits_it(
    cluster: Cluster,
    cluster_operator: ClusterOperator,
    cluster_s3: SeaweedS3,
    bucket: str,
    tmp_path: Path,
    backend: str,
) -> None:
    """`spec.queueName` under the real Kueue controller, with its TrainJob or its PyTorchJob
    integration: each stage's child is created suspended with the queue label, Kueue admits it
    within the ClusterQueue's quota (one pod's worth at a time), the real controllers run it,
    and the job succeeds. Kueue made one Workload per child and admitted each; no stage needed
    a second attempt."""
    from tests.harness.kueue import create_queue, delete_queue

    with cluster.node.api_client() as api:
        queue = create_queue(api, cluster.namespace, {"cpu": "1", "memory": "3Gi"})
    try:
        job = tiny_job("queued", cluster_operator, cluster_s3, bucket, **{
            "queueName": queue.local_queue,
            "stages.classifier.unfreezePhases": 1,
            "resources.trainingBackend": backend,
        })  # fmt: skip
        cluster.apply(job, tmp_path)
        finished = cluster.wait_finished("queued")
        conditions = {c["type"]: c for c in finished["status"]["conditions"]}
        assert conditions["Succeeded"]["status"] == "True", cluster.describe("queued")
        stages = stages_by_name(finished)
        ran = [entry for entry in stages.values() if entry.get("child")]
        children = [entry["child"] for entry in ran]
        assert {"finetune", "classifier", "evaluate"} <= {entry["name"] for entry in ran}, stages
        assert all(entry["attempts"] == 1 for entry in ran), stages
        training = cluster.get(f"{backend}s", selector="ulmfit.io/job=queued")["items"]
        assert {item["metadata"]["name"] for item in training} == {
            entry["child"] for entry in ran if entry["name"] != "evaluate"
        }
        for kind in (f"{backend}s", "jobs"):
            for item in cluster.get(kind, selector="ulmfit.io/job=queued")["items"]:
                labels = item["metadata"]["labels"]
                assert labels["kueue.x-k8s.io/queue-name"] == queue.local_queue, item["metadata"]
        workloads = cluster.get("workloads.kueue.x-k8s.io")["items"]
        admitted = {
            ref["name"]
            for w in workloads
            for ref in w["metadata"].get("ownerReferences") or []
            if any(c["type"] == "Admitted" for c in w["status"].get("conditions") or [])
        }
        assert set(children) <= admitted, (children, admitted)
    finally:
        with cluster.node.api_client() as api:
            delete_queue(api, queue)


# --- 4: a Ray Tune sweep under the real KubeRay operator ------------------------------------------


def test_tune_stage_runs_as_a_rayjob_and_its_best_params_reach_the_classifier(
    cluster: Cluster,
    cluster_operator: ClusterOperator,
    cluster_s3: SeaweedS3,
    bucket: str,
    tmp_path: Path,
    kubectl: Tool,
) -> None:
    """`backend: rayjob`: the real KubeRay operator starts a Ray cluster, submits the sweep and
    reports it complete; the best parameters reach the classifier; the Ray dashboard answers
    through `kubectl port-forward` of the Service the operator made."""
    job = tiny_job("sweep", cluster_operator, cluster_s3, bucket, **{
        "resources.cpu": "1",
        "resources.memory": "3Gi",
        "stages.tune": {
            "space": {"learningRate": {"type": "choice", "values": [0.001, 0.005]}},
            "metric": "validAccuracy",
            "mode": "max",
            "trials": 2,
            "concurrentTrials": 1,
            "cpusPerTrial": 1,
            "scheduler": "fifo",
            "backend": "rayjob",
        },
        "stages.classifier.unfreezePhases": 1,
    })  # fmt: skip
    cluster.apply(job, tmp_path)
    tune = cluster.wait_stage("sweep", "tune", {"Running", "Succeeded", "Failed"}, timeout=600)
    rayjob = tune["child"]

    # While the sweep runs, the dashboard answers through port-forward.
    def head_running() -> bool:
        pods = cluster.get("pods", selector="ray.io/node-type=head")
        return any(p["status"]["phase"] == "Running" and all(
            s.get("ready") for s in p["status"].get("containerStatuses") or [])
            for p in pods["items"])  # fmt: skip

    wait_for(head_running, 300, "the Ray head pod", interval=2)
    port = free_port()
    forward = subprocess.Popen(
        [str(kubectl.path), "port-forward", "-n", cluster.namespace,
         "svc/sweep-tune-dashboard", f"{port}:8265", "--address", "127.0.0.1"],
        env={**os.environ, **kubectl.env, "KUBECONFIG": cluster.kubeconfig},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        def version() -> dict[str, Any]:
            url = f"http://127.0.0.1:{port}/api/version"
            with urllib.request.urlopen(url, timeout=5) as answer:
                return dict(json.load(answer))

        answer = wait_for(version, 120, "the Ray dashboard through port-forward", interval=1)
        assert "ray_version" in answer or "version" in answer, answer
    finally:
        forward.terminate()
        forward.wait(10)

    # KubeRay ran `ray job submit` in the operator's submitter pod: the job's labels (inside its
    # NetworkPolicy), non-root.
    def submitter() -> dict[str, Any] | None:
        pods = cluster.get("pods", selector="ulmfit.io/job=sweep,ulmfit.io/role=ray-submitter")
        return next(iter(pods["items"]), None)

    submit_pod = wait_for(submitter, 120, "the RayJob submitter pod", interval=2)
    assert submit_pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert submit_pod["spec"]["automountServiceAccountToken"] is False
    fence = cluster.get("networkpolicy", "sweep-pods")
    assert fence["spec"]["podSelector"]["matchLabels"] == {"ulmfit.io/job": "sweep"}

    finished = cluster.wait_finished("sweep")
    conditions = {c["type"]: c["status"] for c in finished["status"]["conditions"]}
    assert conditions.get("Succeeded") == "True", cluster.describe("sweep")
    ray = cluster.get("rayjob", rayjob)
    assert ray["status"]["jobStatus"] == "SUCCEEDED", ray["status"]
    best = finished["status"]["result"]["bestParams"]
    assert best["learningRate"] in {0.001, 0.005}
    assert stages_by_name(finished)["classifier"]["state"] == "Succeeded"


# --- 5: a job deleted and applied again under the same name ---------------------------------------


def test_job_recreated_under_the_same_name_trains_from_scratch(
    cluster: Cluster,
    cluster_operator: ClusterOperator,
    cluster_s3: SeaweedS3,
    bucket: str,
    tmp_path: Path,
) -> None:
    """A job deleted after its finetune stage committed its final checkpoint, then applied again
    under the same name, is a new job: its store path carries the new UID, so its finetune
    trains from scratch in its own path instead of finding the old final ("already finished",
    which the operator rightly did not believe, so every attempt failed), and the job succeeds.
    The old job's checkpoints stay where they were."""
    job = tiny_job("again", cluster_operator, cluster_s3, bucket, **{
        "stages.classifier.unfreezePhases": 1,
        "runPolicy.backoffLimit": 1,
    })  # fmt: skip
    cluster.apply(job, tmp_path)
    old_run = cluster.store_run("again")
    old = cluster.wait_stage("again", "finetune", {"Succeeded", "Failed"})
    assert old["state"] == "Succeeded", cluster.describe("again")
    assert f"/{old_run}/finetune/" in old["checkpoint"], old

    selector = "ulmfit.io/job=again"
    cluster.run("delete", "ulmfitjob", "again", "--wait=true", timeout=180)

    def all_gone() -> bool:
        left = cluster.get("trainjobs,jobsets,jobs,configmaps,pods", selector=selector)
        return not left["items"]

    wait_for(all_gone, 180, "the garbage collector to remove the old job's children", interval=1)
    cluster.apply(job, tmp_path)
    new_run = cluster.store_run("again")
    assert new_run != old_run and new_run.startswith(f"{cluster.namespace}/again/")

    finished = cluster.wait_finished("again")
    conditions = {c["type"]: c["status"] for c in finished["status"]["conditions"]}
    assert conditions.get("Succeeded") == "True", cluster.describe("again")
    stages = stages_by_name(finished)
    finetune = stages["finetune"]
    assert (finetune["state"], finetune["attempts"]) == ("Succeeded", 1), finetune
    assert f"/{new_run}/finetune/" in finetune["checkpoint"], finetune
    assert finetune["checkpoint"] != old["checkpoint"]
    # Its finetune really trained, in its own path, from step 0: it resumed from nothing, ran
    # all 6 steps and committed the step-3 checkpoint on the way (checkpointEvery 3).
    record = final_record(cluster_s3, bucket, new_run, "finetune")
    assert (record.step, record.meta.get("resumedFromStep")) == (6, None), record.meta
    assert committed_steps(cluster_s3, bucket, new_run, "finetune") == [3]
    assert f"/{new_run}/" in finished["status"]["result"]["modelUri"], finished["status"]["result"]
    # The old job's checkpoints stay where they were.
    assert committed_steps(cluster_s3, bucket, old_run, "finetune")
    cluster.run("delete", "ulmfitjob", "again", "--wait=false")


# --- 5b: what a TrainJob cannot express ----------------------------------------------------------


def test_pod_override_a_trainjob_cannot_carry_fails_the_job_before_any_child(
    cluster: Cluster,
    cluster_operator: ClusterOperator,
    cluster_s3: SeaweedS3,
    bucket: str,
    tmp_path: Path,
) -> None:
    """A job on the TrainJob backend that asks for a scheduler (which Trainer v2's runtime
    patches cannot set) ends Failed with InvalidSpec, one line naming the field; the operator
    creates no child of any kind. The same override on the PyTorchJob backend is accepted."""
    job = tiny_job("no-scheduler", cluster_operator, cluster_s3, bucket, **{
        "resources.trainingBackend": "trainjob",
        "resources.podTemplate": {"schedulerName": "volcano"},
    })  # fmt: skip
    cluster.apply(job, tmp_path)
    finished = cluster.wait_finished("no-scheduler", timeout=120)
    failed = {c["type"]: c for c in finished["status"]["conditions"]}["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "InvalidSpec"), failed
    assert "spec.resources.podTemplate.schedulerName" in failed["message"], failed
    assert "\n" not in failed["message"], failed
    children = cluster.get(
        "trainjobs,pytorchjobs,jobs,configmaps", selector="ulmfit.io/job=no-scheduler"
    )
    assert children["items"] == []
    cluster.run("delete", "ulmfitjob", "no-scheduler", "--wait=false")


# --- 6: deletion and uninstall cascade ------------------------------------------------------------


def test_job_deletion_and_helm_uninstall_cascade_but_checkpoints_stay(
    cluster: Cluster,
    cluster_operator: ClusterOperator,
    cluster_s3: SeaweedS3,
    bucket: str,
    tmp_path: Path,
    helm: Tool,
) -> None:
    """Deleting a running job removes its children (a TrainJob here), what they made (the
    JobSet, its Jobs and pods), ConfigMaps and Services (the real garbage collector); its
    checkpoints stay in S3. `helm uninstall` removes the operator
    and everything the chart made except the CRD (Helm keeps `crds/`)."""
    job = tiny_job("doomed", cluster_operator, cluster_s3, bucket, **{
        "stages.finetune.maxSteps": 400, "stages.finetune.checkpointEvery": 10,
    })  # fmt: skip
    cluster.apply(job, tmp_path)
    run = cluster.store_run("doomed")
    wait_for(
        lambda: committed_steps(cluster_s3, bucket, run, "finetune"),
        600, "a committed finetune checkpoint", interval=0.5,
    )  # fmt: skip
    selector = "ulmfit.io/job=doomed"
    owned = cluster.get("trainjobs,configmaps", selector=selector)["items"]
    assert {item["kind"] for item in owned} == {"TrainJob", "ConfigMap"}
    assert owned, "the running job has children"
    pods = cluster.get("pods", selector=selector)["items"]
    assert pods, "the running stage has pods"

    cluster.run("delete", "ulmfitjob", "doomed", "--wait=true", timeout=180)

    def all_gone() -> bool:
        left = cluster.get("trainjobs,jobsets,jobs,configmaps,services,pods", selector=selector)
        return not left["items"]

    wait_for(all_gone, 180, "the garbage collector to remove the job's children", interval=1)
    assert committed_steps(cluster_s3, bucket, run, "finetune")

    kubeconfig = cluster.kubeconfig
    helm.run("uninstall", cluster_operator.release, "-n", cluster_operator.namespace, "--wait",
             kubeconfig=kubeconfig, timeout=180)  # fmt: skip

    def operator_gone() -> bool:
        left = cluster.kubectl.run(
            "get", "deployments,pods,serviceaccounts,services", "-n", cluster_operator.namespace,
            "-l", f"app.kubernetes.io/instance={cluster_operator.release}", "-o", "name",
            kubeconfig=kubeconfig,
        ).stdout.split()
        return not left

    wait_for(operator_gone, 120, "the operator's objects to go", interval=1)
    crd = cluster.kubectl.run("get", "crd", "ulmfitjobs.ulmfit.io", "-o", "name",
                              kubeconfig=kubeconfig).stdout  # fmt: skip
    assert crd.strip() == "customresourcedefinition.apiextensions.k8s.io/ulmfitjobs.ulmfit.io"
