"""SIGKILL the operator at random points and check that nothing is lost or doubled.

Some jobs are deleted and created again under the same name in the middle of it all (after their
first stage committed its final checkpoint): each comes back as a new job that runs every stage
afresh, in its own store path, while the operator keeps dying.

The Kubeflow Training Operator and the trainer are played by the harness's `Trainer` (see
tests/integration/test_operator_harness.py); tests/e2e/test_cluster_jobs.py runs the same
paths under the real controllers.
"""

# The shared fixtures are imported from the harness module, so their names come back as
# test parameters:
# ruff: noqa: F811

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from ulmfit_operator.runtime.kube import Kube, job_ref

from tests.harness.ports import wait_for
from tests.harness.s3 import SeaweedS3
from tests.integration.test_operator_harness import (  # noqa: F401 - fixtures
    OperatorProcess,
    Trainer,
    admin,
    collect_garbage,
    create_job,
    evaluation_metrics,
    events,
    get_job,
    is_true,
    job_spec,
    jobs_namespace,
    list_children,
    operator_crds,
    operator_kubeconfig,
    run_path,
    run_to_success,
    start_operator,
    trainer,
    wait_child,
    wait_job_gone,
)

STAGES = ("finetune", "classifier", "evaluate")


class Player(threading.Thread):
    """Finishes every child it sees, once, as the Training Operator and the trainer would. A
    child is known by its uid: a re-created job's children have the old ones' names. A child
    deleted while being finished (its job was) is left, as a killed pod would be."""

    def __init__(self, kube: Kube, trainer: Trainer, namespace: str, pace: float = 0.0):
        super().__init__(daemon=True, name="player")
        self.pace = pace
        self.kube, self.trainer, self.namespace = kube, trainer, namespace
        self.done: set[str] = set()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for child in list_children(self.kube, self.namespace):
                    uid = child["metadata"]["uid"]
                    if uid in self.done:
                        continue
                    stage = child["metadata"]["labels"]["ulmfit.io/stage"]
                    metrics = evaluation_metrics(0.8, 0.2) if stage == "evaluate" else None
                    try:
                        self.trainer.complete(child, metrics)
                    except ApiException as error:
                        if error.status != 404:
                            raise
                    self.done.add(uid)
                    self.stop.wait(self.pace)  # spread the work over the operator's lives
            except Exception as error:  # the API server is fine; keep the first few for the report
                if len(self.errors) < 5:
                    self.errors.append(error)
            self.stop.wait(0.2)


def _all_succeeded(kube: Kube, namespace: str, names: list[str]) -> bool:
    return all(is_true(get_job(kube, namespace, name), "Succeeded") for name in names)


class Recreator:
    """Deletes jobs and creates them again under the same name, once each, after their first
    stage committed its final checkpoint and before they finish; plays the garbage collector
    for the deleted ones (again and again: a reconcile in flight may still create a child of a
    job just deleted)."""

    def __init__(self, kube: Kube, trainer: Trainer, namespace: str, spec: dict[str, Any]):
        self.kube, self.trainer, self.namespace, self.spec = kube, trainer, namespace, spec
        self.runs: dict[str, str] = {}
        """The first instance's run path of each job."""
        self.old: dict[str, tuple[str, str]] = {}
        """Re-created jobs: the deleted instance's uid and its finetune final's URI."""

    def create(self, name: str) -> None:
        self.runs[name] = run_path(create_job(self.kube, self.namespace, name, self.spec))

    def due(self, candidates: list[str]) -> list[str]:
        """Those not yet re-created whose finetune final is committed and that are running."""
        return [
            name
            for name in candidates
            if name not in self.old
            and self.trainer.checkpoints(self.namespace, name, self.runs[name]).final("finetune")
            and not is_true(get_job(self.kube, self.namespace, name), "Succeeded")
        ]

    def recreate(self, name: str) -> None:
        final = self.trainer.checkpoints(self.namespace, name, self.runs[name]).final("finetune")
        assert final is not None
        uid = get_job(self.kube, self.namespace, name)["metadata"]["uid"]
        self.kube.delete(job_ref(self.namespace, name))
        wait_job_gone(self.kube, self.namespace, name, f"{name} to be deleted", interval=0.1)
        self.old[name] = (uid, final.uri)
        self.collect_garbage()
        create_job(self.kube, self.namespace, name, self.spec)

    def collect_garbage(self) -> None:
        for name, (uid, _) in self.old.items():
            collect_garbage(self.kube, self.namespace, name, uid)


def _check_recreated(kube: Kube, trainer: Trainer, recreator: Recreator) -> None:
    """A re-created job ran in its own path, from its own checkpoints; the old one's stay."""
    for name, (old_uid, old_final) in recreator.old.items():
        job = get_job(kube, recreator.namespace, name)
        run = run_path(job)
        assert job["metadata"]["uid"] != old_uid and run != recreator.runs[name]
        checkpoints = [s["checkpoint"] for s in job["status"]["stages"] if s["name"] in STAGES]
        assert len(checkpoints) == len(STAGES) and old_final not in checkpoints
        assert all(f"/{run}/" in uri for uri in checkpoints), (run, checkpoints)
        old_store = trainer.checkpoints(recreator.namespace, name, recreator.runs[name])
        assert old_store.final("finetune") is not None
        assert old_store.final("finetune").uri == old_final


def _check_no_duplicates(kube: Kube, namespace: str, names: list[str]) -> None:
    children = list_children(kube, namespace)
    per_job = Counter(child["metadata"]["labels"]["ulmfit.io/job"] for child in children)
    assert per_job == dict.fromkeys(names, len(STAGES)), per_job
    assert sorted(child["metadata"]["name"] for child in children) == sorted(
        f"{name}-{stage}-a1" for name in names for stage in STAGES
    )
    for name in names:
        job = get_job(kube, namespace, name)
        status: dict[str, Any] = job["status"]
        assert [(s["name"], s["state"], s["attempts"]) for s in status["stages"]] == [
            ("pretrain", "Skipped", 0),
            *((stage, "Succeeded", 1) for stage in STAGES),
        ]
        assert status["result"]["testMetrics"]["accuracy"] == 0.8
        # This instance's events only (a re-created job's name has the old one's too).
        uid = job["metadata"]["uid"]
        mine = [e for e in events(kube, namespace, name) if e["involvedObject"].get("uid") == uid]
        reasons = Counter(e["reason"] for e in mine)
        # An event follows the status change it reports, so a kill never doubles one.
        assert reasons["StageStarted"] <= len(STAGES) and reasons["Succeeded"] <= 1, reasons


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_operator_sigkilled_at_random_points_loses_and_doubles_nothing(
    start_operator,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    ns, rng = jobs_namespace, random.Random(20240601)
    operator: OperatorProcess = start_operator(identity="chaos")
    names = [f"job-{index:02d}" for index in range(20)]
    recreator = Recreator(admin, trainer, ns, job_spec(s3_server, s3_bucket))
    for name in names:
        recreator.create(name)
    # Re-created in the middle of the run: a few jobs, whenever their finetune has committed.
    targets = rng.sample(names, 5)
    # 60 children (and 3 more per re-created job) at one a second: the run outlasts several of
    # the kills' random intervals.
    player = Player(admin, trainer, ns, pace=1.0)
    player.start()
    kills = 0
    deadline = time.monotonic() + 900

    def all_succeeded() -> bool:
        recreator.collect_garbage()
        return _all_succeeded(admin, ns, names)

    try:
        while kills < 10 and time.monotonic() < deadline:
            # Anywhere from mid start-up to well into reconciling.
            time.sleep(rng.uniform(1.0, 12.0))
            if all_succeeded():
                break
            due = recreator.due(targets)[:2]
            down = rng.random() < 0.5  # re-create while the operator is down, or while it runs
            for name in due if not down else ():
                recreator.recreate(name)
            operator.kill()
            kills += 1
            for name in due if down else ():
                recreator.recreate(name)
            operator.start()  # same identity: the lease comes back at once, as in a pod restart
        wait_for(
            all_succeeded,
            max(60, deadline - time.monotonic()),
            "every job to succeed after the kills",
            interval=1,
        )
    finally:
        player.stop.set()
        player.join(10)
    print(
        f"operator killed {kills} times, {operator.starts} starts; "
        f"re-created {sorted(recreator.old)}"
    )
    assert player.errors == []
    assert kills >= 5, "the jobs finished before the operator was killed often enough"
    assert len(recreator.old) >= 2, "the jobs finished before enough of them were re-created"
    recreator.collect_garbage()
    _check_no_duplicates(admin, ns, names)
    _check_recreated(admin, trainer, recreator)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_operator_standby_takes_over_when_the_leader_dies(
    start_operator,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    ns = jobs_namespace
    first = start_operator(identity="replica-a")
    second = start_operator(identity="replica-b", wait=False)
    wait_for(second.healthy, 90, "the standby to start")
    time.sleep(3)
    assert (first.metric("ulmfit_leader"), second.metric("ulmfit_leader")) == (1.0, 0.0)
    create_job(admin, ns, "handover", job_spec(s3_server, s3_bucket))
    trainer.complete(wait_child(admin, ns, "handover-finetune-a1"))
    wait_child(admin, ns, "handover-classifier-a1")
    assert second.metric("ulmfit_reconciles_total") == 0  # the standby only watched
    first.kill()
    second.wait_leading(timeout=60)
    trainer.complete(wait_child(admin, ns, "handover-classifier-a1"))
    trainer.complete(wait_child(admin, ns, "handover-evaluate-a1"), evaluation_metrics(0.8, 0.2))
    wait_for(lambda: _all_succeeded(admin, ns, ["handover"]), 60, "the job to succeed")
    _check_no_duplicates(admin, ns, ["handover"])
