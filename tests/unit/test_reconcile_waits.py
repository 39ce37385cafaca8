"""reconcile() and the attempts that wait: for a queue (Kueue) to admit them, for pods that do
not start (the pending deadline), and what a running or failed attempt reports in the status."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from ulmfit_operator.children import Child, ChildPhase, observe_child
from ulmfit_operator.observations import NeedPods, pod_report
from ulmfit_operator.reconcile import (
    CreateObject,
    Decision,
    DeleteChild,
    NeedStore,
    Observation,
    StopChild,
    reconcile,
)
from ulmfit_operator.status import format_time
from ulmfit_trainer.records import StageProgress

from tests.unit.test_reconcile import (
    CREATED,
    NOW,
    after,
    child,
    condition,
    job,
    progress,
    stage_entry,
)

pytestmark = pytest.mark.timeout(60)

STAGE = "finetune"


def run(
    body: Mapping[str, Any],
    children: Sequence[Child] = (),
    *,
    now: datetime = NOW,
    progress_reports: Mapping[str, StageProgress] | None = None,
    pods: Mapping[str, list[dict[str, Any]]] | None = None,
) -> tuple[Decision, list[Any]]:
    """Reconcile, answering every question it asks; returns the decision and the questions."""
    observation = Observation()
    asked: list[Any] = []
    for _ in range(40):
        answer = reconcile(body, children, observation, now)
        if isinstance(answer, Decision):
            return answer, asked
        asked.append(answer)
        if isinstance(answer, NeedPods):
            observation = observation.with_pods(
                answer.child, pod_report((pods or {}).get(answer.child, []))
            )
        elif answer.what == "checkpoint":
            observation = observation.with_checkpoint(answer.stage, None)
        else:
            observation = observation.with_progress(
                answer.stage, (progress_reports or {}).get(answer.stage)
            )
    raise AssertionError("reconcile kept asking")


def waiting(attempt: int = 1, **kw: Any) -> Child:
    """An attempt a queue holds: suspended, not by the operator."""
    return child(STAGE, attempt, ChildPhase.SUSPENDED, **kw)


def started(body: dict[str, Any]) -> dict[str, Any]:
    """The job once its first attempt was created."""
    decision, _ = run(body)
    assert [a.name for a in _creates(decision) if a.kind == "PyTorchJob"] == [f"topics-{STAGE}-a1"]
    return after(body, decision)


def _creates(decision: Decision) -> list[CreateObject]:
    return [a for a in decision.actions if isinstance(a, CreateObject)]


def _stops(decision: Decision) -> list[StopChild]:
    return [a for a in decision.actions if isinstance(a, StopChild)]


# ------------------------------------------------------------------------------------ queueing


def test_an_attempt_held_by_its_queue_waits_and_no_second_attempt_starts() -> None:
    body = started(job({"queueName": "gpu-team"}))
    decision, _ = run(body, [waiting()], now=NOW + timedelta(hours=3))
    assert _creates(decision) == [] and _stops(decision) == []
    assert decision.state == "Pending"
    status = decision.status or {}
    queued = condition(status, "Queued")
    assert queued is not None and queued["status"] == "True"
    assert queued["reason"] == "WaitingForAdmission"
    assert "LocalQueue gpu-team" in queued["message"] and STAGE in queued["message"]
    entry = stage_entry(status, STAGE)
    assert entry["state"] == "Pending" and entry["failures"] == 0 and entry["attempts"] == 1
    assert entry["queuedSince"] == format_time(CREATED + timedelta(seconds=10))
    assert "waits to be admitted by LocalQueue gpu-team" in entry["message"]
    assert f"{STAGE} queued" in status["progress"]


def test_the_queue_label_on_the_job_works_like_queue_name() -> None:
    body = job()
    body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "shared"}
    first, _ = run(body)
    [made] = [a.body for a in _creates(first) if a.kind == "PyTorchJob"]
    assert made["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "shared"
    assert made["spec"]["runPolicy"]["suspend"] is True
    decision, _ = run(after(body, first), [waiting()])
    queued = condition(decision.status or {}, "Queued")
    assert queued is not None and "LocalQueue shared" in queued["message"]


def test_admission_clears_the_queued_condition_and_time_in_the_queue_does_not_count() -> None:
    body = started(job({"queueName": "gpu-team", "runPolicy": {"pendingDeadlineSeconds": 600}}))
    queued_body = after(body, run(body, [waiting()])[0])
    # Admitted after two hours in the queue; its pods have waited five minutes since.
    admitted = NOW + timedelta(hours=2)
    pending = dataclasses.replace(
        waiting(), phase=ChildPhase.PENDING, resumed=admitted, started=admitted
    )
    decision, asked = run(queued_body, [pending], now=admitted + timedelta(minutes=5))
    assert not [a for a in asked if isinstance(a, NeedPods)]
    assert _stops(decision) == [] and _creates(decision) == []
    queued = condition(decision.status or {}, "Queued")
    assert queued is not None and queued["status"] == "False"
    assert decision.requeue_after == pytest.approx(300, abs=1)


def test_a_queued_attempt_without_an_admission_time_is_not_timed() -> None:
    body = started(job({"queueName": "q", "runPolicy": {"pendingDeadlineSeconds": 60}}))
    pending = child(STAGE, 1, ChildPhase.PENDING)  # no resumed, no started yet
    decision, asked = run(body, [pending], now=NOW + timedelta(hours=5))
    assert not asked or not [a for a in asked if isinstance(a, NeedPods)]
    assert _stops(decision) == []


# ----------------------------------------------------------------------------- pending deadline


UNSCHEDULABLE = {
    "metadata": {"name": "topics-finetune-a1-master-0"},
    "status": {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
            }
        ],
    },
}
PULL_FAILS = {
    "metadata": {"name": "topics-finetune-a1-worker-0"},
    "status": {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "pytorch",
                "state": {
                    "waiting": {
                        "reason": "ImagePullBackOff",
                        "message": 'Back-off pulling image "registry.invalid/trainer:0"',
                    }
                },
            }
        ],
    },
}


def test_pods_that_do_not_start_are_stopped_with_their_own_reasons() -> None:
    body = started(job({"runPolicy": {"pendingDeadlineSeconds": 120}}))
    pending = child(STAGE, 1, ChildPhase.PENDING, created=NOW)
    # Before the deadline: no pods read, a look again when it falls due.
    early, asked = run(body, [pending], now=NOW + timedelta(seconds=100))
    assert asked == [] or not [a for a in asked if isinstance(a, NeedPods)]
    assert _stops(early) == [] and early.requeue_after == pytest.approx(20, abs=1)
    # After it: the pods are asked for, by the attempt's labels, and their reasons reported.
    late, asked = run(
        body,
        [pending],
        now=NOW + timedelta(seconds=130),
        pods={pending.name: [UNSCHEDULABLE, PULL_FAILS]},
    )
    [need] = [a for a in asked if isinstance(a, NeedPods)]
    assert need.namespace == "team"
    assert need.selector == f"ulmfit.io/job=topics,ulmfit.io/stage={STAGE},ulmfit.io/attempt=1"
    [stop] = _stops(late)
    assert stop.child.name == pending.name
    assert stop.reason.startswith("PendingDeadlineExceeded: pod topics-finetune-a1-master-0: ")
    assert "Insufficient nvidia.com/gpu" in stop.reason and "ImagePullBackOff" in stop.reason
    [event] = [e for e in late.events if e.reason == "PendingDeadlineExceeded"]
    assert event.type == "Warning" and "did not start in 130s" in event.message
    assert "registry.invalid/trainer:0" in event.message
    # The stopped attempt counts against the backoff limit; the next starts once the stop
    # has landed, as attempt 2.
    assert _creates(late) == []
    assert stage_entry(late.status or {}, STAGE)["failures"] == 1
    stopped = dataclasses.replace(pending, stopped=stop.reason)
    retry, _ = run(after(body, late), [stopped], now=NOW + timedelta(seconds=131))
    assert [a.name for a in _creates(retry) if a.kind == "PyTorchJob"] == [f"topics-{STAGE}-a2"]


def test_the_pending_deadline_can_use_up_the_backoff_limit() -> None:
    body = started(job({"runPolicy": {"pendingDeadlineSeconds": 60, "backoffLimit": 0}}))
    pending = child(STAGE, 1, ChildPhase.PENDING, created=NOW)
    decision, _ = run(
        body, [pending], now=NOW + timedelta(seconds=61), pods={pending.name: [UNSCHEDULABLE]}
    )
    failed = condition(decision.status or {}, "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"
    # The stopped attempt stays (suspended, annotated) as the record; it is not deleted.
    assert [a.child.name for a in _stops(decision)] == [pending.name]
    assert not [a for a in decision.actions if isinstance(a, DeleteChild)]
    assert "PendingDeadlineExceeded: pod topics-finetune-a1-master-0: Unschedulable" in (
        failed["message"]
    )


def test_no_pending_deadline_when_it_is_null() -> None:
    body = started(job({"runPolicy": {"pendingDeadlineSeconds": None}}))
    pending = child(STAGE, 1, ChildPhase.PENDING, created=NOW)
    decision, asked = run(body, [pending], now=NOW + timedelta(days=3))
    assert not [a for a in asked if isinstance(a, NeedPods)] and _stops(decision) == []


def test_pod_report_names_each_stuck_pod_and_says_when_there_are_none() -> None:
    assert pod_report([]) == "no pods were created"
    missing_secret = {
        "metadata": {"name": "p"},
        "status": {
            "initContainerStatuses": [],
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "waiting": {
                            "reason": "CreateContainerConfigError",
                            "message": 'secret "s3-keys" not found',
                        }
                    },
                },
                {"name": "ok", "state": {"waiting": {"reason": "ContainerCreating"}}},
            ],
        },
    }
    assert pod_report([missing_secret]) == (
        'pod p container trainer: CreateContainerConfigError: secret "s3-keys" not found'
    )
    running = {"metadata": {"name": "r"}, "status": {"phase": "Running"}}
    assert pod_report([running]) == ""


def test_a_resumed_condition_is_read_as_the_admission_time() -> None:
    body = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": "topics-finetune-a1",
            "namespace": "team",
            "labels": {"ulmfit.io/job": "topics", "ulmfit.io/stage": STAGE},
        },
        "spec": {"runPolicy": {"suspend": False}},
        "status": {
            "conditions": [
                {
                    "type": "Suspended",
                    "status": "False",
                    "reason": "PyTorchJobResumed",
                    "lastTransitionTime": "2026-03-01T14:00:00Z",
                },
                {"type": "Created", "status": "True"},
            ]
        },
    }
    seen = observe_child(body)
    assert seen is not None and seen.phase == ChildPhase.PENDING
    assert seen.resumed == datetime.fromisoformat("2026-03-01T14:00:00+00:00")
    body["spec"]["runPolicy"]["suspend"] = True
    held = observe_child(body)
    assert held is not None and held.waiting and held.active


# ------------------------------------------------------------------- failures and live progress


def test_a_failed_attempt_reports_the_trainers_error_line_once_and_keeps_it() -> None:
    body = started(job())
    failed = child(STAGE, 1, ChildPhase.FAILED, created=NOW, message="PyTorchJobFailed: exit 1")
    report = StageProgress(
        stage=STAGE,
        state="failed",
        updated_at=format_time(NOW + timedelta(minutes=1)),
        error="ValueError: data.textField 'body' is not a column",
    )
    first, asked = run(body, [failed], progress_reports={STAGE: report})
    assert (STAGE, "progress") in [(a.stage, a.what) for a in asked if isinstance(a, NeedStore)]
    entry = stage_entry(first.status or {}, STAGE)
    assert entry["lastError"] == "ValueError: data.textField 'body' is not a column"
    assert entry["message"] == (
        "attempt 1 failed: ValueError: data.textField 'body' is not a column "
        "(PyTorchJobFailed: exit 1)"
    )
    # Next time the store is not asked again (the retry's reports replace that file).
    second_attempt = child(STAGE, 2, ChildPhase.RUNNING, created=NOW + timedelta(minutes=2))
    again, asked = run(
        after(body, first), [failed, second_attempt], now=NOW + timedelta(minutes=3)
    )
    assert entry["lastError"] == stage_entry(again.status or after(body, first)["status"], STAGE)[
        "lastError"
    ]


def test_a_running_stage_shows_step_loss_throughput_and_eta() -> None:
    body = started(job())
    running = child(STAGE, 1, ChildPhase.RUNNING, created=NOW)
    t1 = NOW + timedelta(minutes=1)
    first, _ = run(
        body,
        [running],
        now=t1,
        progress_reports={STAGE: progress(STAGE, t1, step=100, total_steps=1000, loss=2.5)},
    )
    live = stage_entry(first.status or {}, STAGE)["progress"]
    assert live["step"] == 100 and live["totalSteps"] == 1000 and live["loss"] == 2.5
    assert "etaSeconds" not in live  # one report gives no pace yet
    t2 = t1 + timedelta(seconds=60)
    second, _ = run(
        after(body, first),
        [running],
        now=t2,
        progress_reports={
            STAGE: progress(STAGE, t2, step=200, total_steps=1000, tokens_per_second=5e4)
        },
    )
    status = second.status or {}
    live = stage_entry(status, STAGE)["progress"]
    assert live["etaSeconds"] == 480  # 800 steps at 0.6 s a step
    assert live["tokensPerSecond"] == 5e4
    assert status["eta"] == "8m00s"
    # The same report seen again keeps its ETA.
    third, _ = run(
        after(body, second),
        [running],
        now=t2 + timedelta(seconds=20),
        progress_reports={
            STAGE: progress(STAGE, t2, step=200, total_steps=1000, tokens_per_second=5e4)
        },
    )
    assert third.status is None or third.status["eta"] == "8m00s"


# ---------------------------------------------------------------------------- per-job gauges


def test_gauges_follow_the_ready_stages_and_go_with_the_job() -> None:
    from prometheus_client import CollectorRegistry
    from ulmfit_operator.metrics import OperatorMetrics

    body = started(job({"queueName": "q"}))
    queued, _ = run(body, [waiting()], now=NOW + timedelta(minutes=5))
    [gauge] = queued.gauges
    assert gauge.stage == STAGE and gauge.attempts == 1 and gauge.progress is None
    assert gauge.queued_seconds == pytest.approx(5 * 60 - 10 + 5 * 60, abs=1)

    running = child(STAGE, 1, ChildPhase.RUNNING, created=NOW)
    report = progress(STAGE, NOW, step=250, total_steps=1000, loss=1.5, tokens_per_second=900.0)
    live, _ = run(after(body, queued), [running], progress_reports={STAGE: report})
    [gauge] = live.gauges
    assert (gauge.progress, gauge.loss, gauge.tokens_per_second) == (0.25, 1.5, 900.0)
    assert gauge.queued_seconds is None

    registry = CollectorRegistry()
    metrics = OperatorMetrics(registry)
    labels = {"namespace": "team", "job": "topics", "stage": STAGE}
    metrics.jobs.update("team", "topics", queued.gauges)
    assert registry.get_sample_value("ulmfit_stage_queued_seconds", labels) is not None
    metrics.jobs.update("team", "topics", live.gauges)
    assert registry.get_sample_value("ulmfit_stage_progress_ratio", labels) == 0.25
    assert registry.get_sample_value("ulmfit_stage_queued_seconds", labels) is None
    metrics.jobs.update("team", "other", live.gauges)
    metrics.jobs.drop("team", "topics")
    for name in ("progress_ratio", "loss", "tokens_per_second", "attempts"):
        assert registry.get_sample_value(f"ulmfit_stage_{name}", labels) is None
    assert registry.get_sample_value("ulmfit_stage_attempts", {**labels, "job": "other"}) == 1
