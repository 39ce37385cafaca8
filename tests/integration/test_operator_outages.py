"""Outages of what the operator stands on: the API server restarts, the S3 store goes away.

Jobs continue, the job's status says what happened, and nothing is lost: the API server is
restarted (twice) in the middle of a run, and the S3 server is stopped (twice) while the
operator reads a running stage's progress.

The Kubeflow Training Operator and the trainer are played by the harness's `Trainer` (see
tests/integration/test_operator_harness.py), so a child "runs" as long as the test says.
"""

# The shared fixtures are imported from the harness module, so their names come back as
# test parameters:
# ruff: noqa: F811

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from ulmfit_operator.children import ChildRef
from ulmfit_operator.runtime.kube import Kube

from tests.harness.kube import ControlPlane
from tests.harness.s3 import SeaweedS3
from tests.integration.test_operator_harness import (  # noqa: F401 - fixtures
    OPERATOR_NAMESPACE,
    OperatorProcess,
    Trainer,
    admin,
    condition,
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
    wait_job,
)

STAGES = ("finetune", "classifier", "evaluate")


def _stage(job: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in (job.get("status") or {}).get("stages") or [] if s["name"] == name)


def _lease(kube: Kube, operator: OperatorProcess) -> dict[str, Any]:
    ref = ChildRef("coordination.k8s.io/v1", "Lease", OPERATOR_NAMESPACE, operator.lease_name)
    spec: dict[str, Any] = kube.get(ref)["spec"]
    return spec


def _check_ran_once(kube: Kube, namespace: str, names: list[str]) -> None:
    """One child per stage (attempt 1), every stage Succeeded once, with its checkpoint in this
    job instance's run path."""
    children = list_children(kube, namespace)
    assert sorted(child["metadata"]["name"] for child in children) == sorted(
        f"{name}-{stage}-a1" for name in names for stage in STAGES
    )
    for name in names:
        job = get_job(kube, namespace, name)
        stages = job["status"]["stages"]
        assert [(s["name"], s["state"], s["attempts"]) for s in stages] == [
            ("pretrain", "Skipped", 0),
            *((stage, "Succeeded", 1) for stage in STAGES),
        ]
        run = run_path(job)
        assert all(f"/{run}/" in s["checkpoint"] for s in stages if s["name"] in STAGES)
        reasons = Counter(e["reason"] for e in events(kube, namespace, name))
        assert reasons["StageStarted"] <= len(STAGES) and reasons["Succeeded"] == 1, reasons


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_operator_rides_out_api_server_restarts(
    start_operator,
    kube_cluster: ControlPlane,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    """The API server restarts twice mid-run: the operator keeps running (it stops acting while
    it cannot renew its Lease, and takes it back), its watches come back, and every stage runs
    exactly once."""
    ns, spec = jobs_namespace, job_spec(s3_server, s3_bucket)
    operator = start_operator(identity="outage-api")
    transitions = _lease(admin, operator).get("leaseTransitions")
    create_job(admin, ns, "bounce", spec)
    trainer.complete(wait_child(admin, ns, "bounce-finetune-a1"))
    classifier = wait_child(admin, ns, "bounce-classifier-a1")
    trainer.progress(ns, "bounce", "classifier", 10, 100)

    started = time.monotonic()
    kube_cluster.restart()  # while the classifier runs: far longer than the Lease's 4 s
    first_down = time.monotonic() - started
    # The child watch is back: a child turning Running shows in the job's status (nothing in
    # the store says so).
    trainer.set_status(classifier, "Running")
    wait_job(
        admin,
        ns,
        "bounce",
        lambda job: _stage(job, "classifier")["state"] == "Running",
        "the classifier's child seen Running after the restart",
        timeout=60,
    )
    # The job watch is back: a job created now is picked up.
    create_job(admin, ns, "after", spec)
    wait_child(admin, ns, "after-finetune-a1")
    trainer.complete(classifier)
    evaluate = wait_child(admin, ns, "bounce-evaluate-a1")

    started = time.monotonic()
    kube_cluster.restart()  # right after a child was created
    second_down = time.monotonic() - started
    trainer.complete(evaluate, evaluation_metrics(0.8, 0.2))
    run_to_success(admin, trainer, ns, "after")
    wait_job(admin, ns, "bounce", lambda job: is_true(job, "Succeeded"), "Succeeded", 60)
    print(f"API server down {first_down:.1f}s and {second_down:.1f}s")

    assert operator.running and operator.starts == 1, "the operator exited"
    operator.wait_leading(timeout=30)
    lease = _lease(admin, operator)
    assert lease["holderIdentity"] == "outage-api"
    assert lease.get("leaseTransitions") == transitions  # taken back, never handed over
    _check_ran_once(admin, ns, ["bounce", "after"])


def _store_condition(job: dict[str, Any]) -> dict[str, Any] | None:
    return condition(job, "StoreReachable")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_operator_reports_a_store_outage_and_goes_on_after_it(
    start_operator,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    """The S3 server stops twice while the classifier runs: each time the job's status says the
    store cannot be read (one Warning event per outage) and says so no more once it can; the
    job stays Running, its child is left alone, and no checkpoint is lost."""
    ns = jobs_namespace
    operator = start_operator(identity="outage-s3")
    create_job(admin, ns, "dry", job_spec(s3_server, s3_bucket))
    finetune_uri = trainer.complete(wait_child(admin, ns, "dry-finetune-a1"))
    classifier = wait_child(admin, ns, "dry-classifier-a1")
    trainer.set_status(classifier, "Running")
    trainer.progress(ns, "dry", "classifier", 10, 100)
    wait_job(
        admin,
        ns,
        "dry",
        lambda job: job["status"].get("progress") == "classifier 10%",
        "the classifier's progress read",
        timeout=30,
    )
    assert _store_condition(get_job(admin, ns, "dry")) is None  # no outage, no condition

    for outage in (1, 2):
        s3_server.stop()
        try:
            job = wait_job(
                admin,
                ns,
                "dry",
                lambda job: (_store_condition(job) or {}).get("status") == "False",
                f"outage {outage}: StoreReachable=False",
                timeout=30,
            )
            down = _store_condition(job)
            assert down is not None and down["reason"] == "StoreUnavailable"
            assert s3_server.endpoint in down["message"] and repr(s3_bucket) in down["message"]
            assert "unavailable" in down["message"]
            time.sleep(4)  # a few resyncs (1 s) and retries while the store is down
            job = get_job(admin, ns, "dry")
            assert _store_condition(job) == down  # said once, not rewritten on every retry
            assert is_true(job, "Running") and not is_true(job, "Failed")
            assert _stage(job, "classifier")["state"] == "Running"
            children = {c["metadata"]["name"]: c for c in list_children(admin, ns)}
            assert sorted(children) == ["dry-classifier-a1", "dry-finetune-a1"]
            child = children["dry-classifier-a1"]
            assert not child["metadata"].get("deletionTimestamp")
            assert not (child["spec"].get("runPolicy") or {}).get("suspend")
        finally:
            s3_server.start()
        job = wait_job(
            admin,
            ns,
            "dry",
            lambda job: (_store_condition(job) or {}).get("status") == "True",
            f"outage {outage}: StoreReachable=True",
            timeout=30,
        )
        up = _store_condition(job)
        assert up is not None and up["reason"] == "StoreReadable"
        assert up["lastTransitionTime"] >= down["lastTransitionTime"]
        warnings = [e for e in events(admin, ns, "dry") if e["reason"] == "StoreUnavailable"]
        assert len(warnings) == outage and all(e["type"] == "Warning" for e in warnings)
        assert down["message"] in [e["message"] for e in warnings]

    # The run goes on from where it was: the finetune checkpoint is still the one it made.
    trainer.progress(ns, "dry", "classifier", 50, 100)
    trainer.complete(classifier)
    trainer.complete(wait_child(admin, ns, "dry-evaluate-a1"), evaluation_metrics(0.8, 0.2))
    job = wait_job(admin, ns, "dry", lambda job: is_true(job, "Succeeded"), "Succeeded", 60)
    assert _stage(job, "finetune")["checkpoint"] == finetune_uri
    assert trainer.checkpoints(ns, "dry").final("finetune").uri == finetune_uri
    _check_ran_once(admin, ns, ["dry"])
    reasons = Counter(e["reason"] for e in events(admin, ns, "dry"))
    assert (reasons["StoreUnavailable"], reasons["StoreReadable"]) == (2, 2), reasons
    assert operator.metric("ulmfit_reconcile_errors_total", error="StoreUnavailable") >= 2
    assert operator.running and operator.starts == 1
