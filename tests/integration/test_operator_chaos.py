"""SIGKILL the operator at random points and check that nothing is lost or doubled.

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
from ulmfit_operator.runtime.kube import Kube

from tests.harness.ports import wait_for
from tests.harness.s3 import SeaweedS3
from tests.integration.test_operator_harness import (  # noqa: F401 - fixtures
    OperatorProcess,
    Trainer,
    admin,
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
    run_to_success,
    start_operator,
    trainer,
    wait_child,
)

STAGES = ("finetune", "classifier", "evaluate")


class Player(threading.Thread):
    """Finishes every child it sees, once, as the Training Operator and the trainer would."""

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
                    name = child["metadata"]["name"]
                    if name in self.done:
                        continue
                    stage = child["metadata"]["labels"]["ulmfit.io/stage"]
                    metrics = evaluation_metrics(0.8, 0.2) if stage == "evaluate" else None
                    self.trainer.complete(child, metrics)
                    self.done.add(name)
                    self.stop.wait(self.pace)  # spread the work over the operator's lives
            except Exception as error:  # the API server is fine; keep the first few for the report
                if len(self.errors) < 5:
                    self.errors.append(error)
            self.stop.wait(0.2)


def _all_succeeded(kube: Kube, namespace: str, names: list[str]) -> bool:
    return all(is_true(get_job(kube, namespace, name), "Succeeded") for name in names)


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
        reasons = Counter(e["reason"] for e in events(kube, namespace, name))
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
    for name in names:
        create_job(admin, ns, name, job_spec(s3_server, s3_bucket))
    # 60 children at one a second: the run outlasts several of the kills' random intervals.
    player = Player(admin, trainer, ns, pace=1.0)
    player.start()
    kills = 0
    deadline = time.monotonic() + 900
    try:
        while kills < 10 and time.monotonic() < deadline:
            # Anywhere from mid start-up to well into reconciling.
            time.sleep(rng.uniform(1.0, 12.0))
            if _all_succeeded(admin, ns, names):
                break
            operator.kill()
            kills += 1
            operator.start()  # same identity: the lease comes back at once, as in a pod restart
        wait_for(
            lambda: _all_succeeded(admin, ns, names),
            max(60, deadline - time.monotonic()),
            "every job to succeed after the kills",
            interval=1,
        )
    finally:
        player.stop.set()
        player.join(10)
    print(f"operator killed {kills} times, {operator.starts} starts")
    assert player.errors == []
    assert kills >= 5, "the jobs finished before the operator was killed often enough"
    _check_no_duplicates(admin, ns, names)


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
