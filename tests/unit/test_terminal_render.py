"""What `ulmfit get|describe|logs|dashboard` show, from a job's JSON alone (no cluster)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from ulmfit_operator.children import LABEL_ATTEMPT, LABEL_JOB, LABEL_STAGE
from ulmfit_operator.terminal import render

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def ago(**delta: float) -> str:
    return (NOW - timedelta(**delta)).strftime("%Y-%m-%dT%H:%M:%SZ")


def job(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ulmfit.io/v1alpha1",
        "kind": "ULMFiTJob",
        "metadata": {"name": "topics", "namespace": "ml", "creationTimestamp": ago(minutes=42)},
        "spec": spec,
        "status": status or {},
    }


RUNNING = {
    "currentStage": "classifier",
    "progress": "classifier phase 2/4, 63%",
    "conditions": [
        {"type": "Running", "status": "True", "reason": "StageRunning",
         "message": "classifier attempt 2", "lastTransitionTime": ago(minutes=5)},
        {"type": "Suspended", "status": "False", "reason": "NotSuspended",
         "lastTransitionTime": ago(minutes=40)},
    ],
    "stages": [
        {"name": "finetune", "kind": "finetune", "state": "Succeeded", "attempts": 1,
         "child": "topics-finetune-1", "checkpoint": "s3://b/runs/ml/topics/u/finetune/final",
         "metrics": {"perplexity": 31.25, "loss": 3.44}},
        {"name": "classifier", "kind": "classifier", "state": "Running", "attempts": 2,
         "failures": 1, "child": "topics-classifier-2",
         "progress": {"step": 120, "totalSteps": 400, "loss": 0.61234, "tokensPerSecond": 1523.7,
                      "etaSeconds": 754, "updatedAt": ago(seconds=10)}},
        {"name": "evaluate", "kind": "evaluate", "state": "Pending"},
    ],
}  # fmt: skip


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


def test_table_aligns_columns_like_kubectl() -> None:
    text = render.table(("NAME", "AGE"), [["a", "5m"], ["longer-name", "2d"]])
    assert text.splitlines() == ["NAME          AGE", "a             5m", "longer-name   2d"]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (-3, "-"), (0, "0s"), (59, "59s"), (61, "1m1s"), (754, "12m"),
     (3600, "1h"), (3 * 3600 + 120, "3h2m"), (86400 * 2 + 3600 * 4, "2d4h"), (86400 * 12, "12d")],
)  # fmt: skip
def test_durations_read_like_kubectl_ages(seconds: float | None, shown: str) -> None:
    assert render.duration(seconds) == shown


def test_job_state_prefers_the_final_conditions_then_why_it_waits() -> None:
    def with_true(*kinds: str) -> dict[str, Any]:
        return job({"conditions": [{"type": k, "status": "True"} for k in kinds]})

    assert render.job_state(job()) == "Pending"
    assert render.job_state(with_true("Running")) == "Running"
    assert render.job_state(with_true("Running", "Queued")) == "Queued"
    assert render.job_state(with_true("Running", "Suspended")) == "Suspended"
    assert render.job_state(with_true("Failed", "Running")) == "Failed"
    assert render.job_state(with_true("Succeeded")) == "Succeeded"


def test_jobs_table_shows_state_stage_progress_eta_and_age() -> None:
    done = job({"conditions": [{"type": "Succeeded", "status": "True"}]})
    done["metadata"] = {"name": "another", "creationTimestamp": ago(days=3)}
    table = rows(render.jobs_table([job(RUNNING), done], NOW))
    assert table[0] == ["NAME", "STATE", "STAGE", "PROGRESS", "ETA", "AGE"]
    assert table[1] == ["another", "Succeeded", "-", "-", "-", "3d"]
    assert table[2] == ["topics", "Running", "classifier", "classifier", "phase", "2/4,", "63%",
                        "12m", "42m"]  # fmt: skip


def test_stages_table_shows_live_progress_where_the_status_has_it() -> None:
    table = rows(render.stages_table(job(RUNNING)))
    assert table[0] == ["STAGE", "STATE", "ATTEMPTS", "PROGRESS", "LOSS", "TOKENS/S", "ETA",
                        "CHECKPOINT", "METRICS"]  # fmt: skip
    assert table[1] == ["finetune", "Succeeded", "1", "done", "-", "-", "-", "yes",
                        "loss=3.44", "perplexity=31.25"]  # fmt: skip
    assert table[2] == ["classifier", "Running", "2", "(1", "failed)", "120/400", "(30%)",
                        "0.6123", "1524", "12m", "no", "-"]  # fmt: skip
    assert table[3] == ["evaluate", "Pending", "0", "-", "-", "-", "-", "no", "-"]


def test_a_status_without_the_new_fields_or_with_junk_does_not_crash() -> None:
    odd = {
        "stages": [
            {"name": "classifier", "state": "Running", "attempts": "x", "progress": "soon",
             "metrics": ["not", "a", "dict"]},
            {"name": "evaluate", "progress": {"step": 3}},
            "not a stage",
            {"state": "nameless"},
        ],
        "conditions": "nope",
        "currentStage": 7,
    }  # fmt: skip
    table = rows(render.stages_table(job(odd)))
    assert [row[0] for row in table[1:]] == ["classifier", "evaluate"]
    assert table[2][3:5] == ["step", "3"]
    assert render.job_state(job(odd)) == "Pending"
    assert render.jobs_table([job(odd), {"metadata": {}}], NOW)
    assert render.describe(job(odd), [], NOW)
    assert "no stages in status" in render.stages_table(job({"stages": None}))


def test_key_metrics_come_first_and_are_capped() -> None:
    metrics = {"zeta": 1.0, "accuracy": 0.91234, "macroF1": 0.8, "pseudoLabels/a": 3, "beta": 2}
    assert render.metrics_cell(metrics) == "accuracy=0.9123 macroF1=0.8 beta=2"
    assert render.metrics_cell({}) == "-"


def test_current_stages_fall_back_to_the_last_tried_stage() -> None:
    assert render.current_stages(job(RUNNING)) == ["classifier"]
    cotrain = {"currentStage": "cotrain-a, cotrain-b"}
    assert render.current_stages(job(cotrain)) == ["cotrain-a", "cotrain-b"]
    no_current = {**RUNNING, "currentStage": None}
    assert render.current_stages(job(no_current)) == ["classifier"]
    assert render.current_stages(job()) == []


def test_job_eta_is_the_longest_among_concurrent_stages() -> None:
    status = {
        "currentStage": "cotrain-a,cotrain-b",
        "stages": [
            {"name": "cotrain-a", "state": "Running", "progress": {"etaSeconds": 30}},
            {"name": "cotrain-b", "state": "Running", "progress": {"etaSeconds": 90.5}},
            {"name": "classifier", "state": "Pending", "progress": {"etaSeconds": 9999}},
        ],
    }
    assert render.job_eta(job(status)) == 90.5
    assert render.job_eta(job({"currentStage": "x"})) is None


def test_describe_shows_spec_stages_conditions_and_events_newest_last() -> None:
    status = {
        **RUNNING,
        "conditions": [*RUNNING["conditions"],
                       {"type": "Queued", "status": "False", "reason": "Admitted",
                        "message": "admitted by ClusterQueue gpu",
                        "lastTransitionTime": ago(minutes=30)}],
        "tune": {"backend": "pod", "service": "topics-ray", "dashboard": "http://localhost:8265",
                 "portForward": "kubectl port-forward -n ml svc/topics-ray 8265:8265"},
        "result": {"modelUri": "s3://b/model", "testMetrics": {"accuracy": 0.9}},
    }  # fmt: skip
    events = [
        {"type": "Normal", "reason": "StageSucceeded", "message": "finetune done",
         "lastTimestamp": ago(minutes=6), "count": 1,
         "involvedObject": {"kind": "ULMFiTJob", "name": "topics"}},
        {"type": "Warning", "reason": "BackOff", "message": "pod restarted",
         "eventTime": ago(minutes=1), "count": 3,
         "involvedObject": {"kind": "Pod", "name": "topics-classifier-2-master-0"}},
        {"type": "Normal", "reason": "Created", "message": "first",
         "metadata": {"creationTimestamp": ago(minutes=41)},
         "involvedObject": {"kind": "PyTorchJob", "name": "topics-finetune-1"}},
    ]  # fmt: skip
    text = render.describe(
        job(status, storage={"s3": {"bucket": "b"}}, runPolicy={"backoffLimit": 3}), events, NOW
    )
    lines = text.splitlines()
    assert "Name:        topics" in lines and "Namespace:   ml" in lines
    assert "State:       Running" in lines and "ETA:         12m" in lines
    assert "Model:       s3://b/model" in lines
    assert any("http://localhost:8265" in line for line in lines)
    assert "  storage: s3.bucket=b" in lines
    assert "  runPolicy: backoffLimit=3" in lines
    sections = [line for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert sections == ["Spec:", "Stages:", "Conditions:", "Events:"]
    conditions = rows(text.split("Conditions:")[1].split("Events:")[0])
    assert conditions[1][:3] == ["Running", "True", "StageRunning"]
    assert conditions[3][:3] == ["Queued", "False", "Admitted"]
    assert conditions[3][-1] == "30m"
    reasons = [row[2] if not row[1].startswith("(x") else row[3]
               for row in rows(text.split("Events:")[1])[1:]]  # fmt: skip
    assert reasons == ["Created", "StageSucceeded", "BackOff"]
    assert "1m (x3)" in text and "Pod/topics-classifier-2-master-0" in text


def test_spec_summary_lists_each_sections_settings_wrapped() -> None:
    spec = {"storage": {"s3": {"endpoint": "http://s3:9000", "bucket": "b"}, "ref": "s"},
            "seed": 7, "data": {"labels": ["a", "b"]},
            "model": {f"setting{i}": "x" * 20 for i in range(40)}}  # fmt: skip
    lines = render.spec_summary(job(**spec))
    assert lines[:3] == [
        "storage: s3.endpoint=http://s3:9000 s3.bucket=b ref=s",
        "seed: 7",
        'data: labels=["a","b"]',
    ]
    model = lines[3:]
    assert len(model) == 3 and model[0].startswith("model: setting0=") and model[2].endswith(" …")
    assert model[1].startswith("       setting")  # continuation lines align under the values
    assert all(len(line) <= len("model: ") + 100 + 2 for line in model)


def test_relevant_events_are_those_of_the_job_and_its_children() -> None:
    events = [
        {"involvedObject": {"kind": "ULMFiTJob", "name": "topics"}},
        {"involvedObject": {"kind": "Pod", "name": "topics-classifier-2-master-0"}},
        {"involvedObject": {"kind": "ULMFiTJob", "name": "other"}},
        {"involvedObject": {"kind": "Pod", "name": "topics"}},
        {},
    ]
    family = [("ULMFiTJob", "topics"), ("Pod", "topics-classifier-2-master-0")]
    assert render.relevant_events(events, family) == events[:2]


# --------------------------------------------------------------------------- logs: which pods


def pod(name: str, stage: str, attempt: int, containers: tuple[str, ...] = ("trainer",)) -> dict:
    labels = {LABEL_JOB: "topics", LABEL_STAGE: stage, LABEL_ATTEMPT: str(attempt)}
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": c} for c in containers]},
    }


def test_logs_read_the_current_attempt_of_the_current_stage() -> None:
    (target,) = render.log_targets(job(RUNNING))
    assert target.selector == f"{LABEL_JOB}=topics,{LABEL_STAGE}=classifier,{LABEL_ATTEMPT}=2"


def test_logs_of_a_named_stage_use_its_own_last_attempt() -> None:
    (target,) = render.log_targets(job(RUNNING), stage="finetune")
    assert target.selector == f"{LABEL_JOB}=topics,{LABEL_STAGE}=finetune,{LABEL_ATTEMPT}=1"
    # A stage without an attempt yet: any pod of it (there is none until it starts).
    (target,) = render.log_targets(job(RUNNING), stage="evaluate")
    assert target.selector == f"{LABEL_JOB}=topics,{LABEL_STAGE}=evaluate"


def test_logs_of_concurrent_stages_read_each_stage() -> None:
    status = {
        "currentStage": "cotrain-a,cotrain-b",
        "stages": [{"name": "cotrain-a", "attempts": 1}, {"name": "cotrain-b", "attempts": 3}],
    }
    selectors = [t.selector for t in render.log_targets(job(status))]
    assert selectors == [
        f"{LABEL_JOB}=topics,{LABEL_STAGE}=cotrain-a,{LABEL_ATTEMPT}=1",
        f"{LABEL_JOB}=topics,{LABEL_STAGE}=cotrain-b,{LABEL_ATTEMPT}=3",
    ]


def test_all_pods_reads_every_attempt() -> None:
    assert [t.selector for t in render.log_targets(job(RUNNING), all_pods=True)] == [
        f"{LABEL_JOB}=topics"
    ]
    (target,) = render.log_targets(job(RUNNING), stage="classifier", all_pods=True)
    assert target.selector == f"{LABEL_JOB}=topics,{LABEL_STAGE}=classifier"


def test_an_unknown_stage_is_refused_with_the_known_ones() -> None:
    with pytest.raises(render.NoSuchStage, match=r"no stage 'nope'.*finetune, classifier"):
        render.log_targets(job(RUNNING), stage="nope")
    # A job without stages in its status yet: the label selector decides.
    assert render.log_targets(job(), stage="nope")[0].selector.endswith(f"{LABEL_STAGE}=nope")
    assert render.log_targets(job()) == []


def test_pods_are_ordered_by_stage_attempt_and_name_once_each() -> None:
    pods = [
        pod("topics-classifier-10-worker-0", "classifier", 10),
        pod("topics-classifier-2-worker-0", "classifier", 2),
        pod("topics-classifier-2-master-0", "classifier", 2),
        pod("topics-classifier-2-master-0", "classifier", 2),
        pod("topics-cotrain-a-1-master-0", "cotrain-a", 1),
    ]
    assert [p["metadata"]["name"] for p in render.order_pods(pods)] == [
        "topics-classifier-2-master-0",
        "topics-classifier-2-worker-0",
        "topics-classifier-10-worker-0",
        "topics-cotrain-a-1-master-0",
    ]


def test_the_trainer_container_is_read_unless_another_is_asked_for() -> None:
    two = pod("p", "tune", 1, ("trainer", "sidecar"))
    assert render.pod_container(two) == "trainer"
    assert render.pod_container(two, "sidecar") == "sidecar"
    assert render.pod_container(two, "missing") is None
    assert render.pod_container({"metadata": {"name": "bare"}}) is None


def test_a_pod_that_has_not_started_says_why() -> None:
    assert render.not_started({"status": {"phase": "Pending"}}) == (
        "Pending (not scheduled or started yet)"
    )
    creating = {"phase": "Pending", "containerStatuses": [
        {"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}]}  # fmt: skip
    assert render.not_started({"status": creating}) == "Pending: ContainerCreating"
    running = {"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]}
    assert render.not_started({"status": running}) is None
    # A pod that ran and was restarted shows its log, even while it waits again.
    restarted = {"phase": "Pending", "containerStatuses": [{"state": {"terminated": {}}}]}
    assert render.not_started({"status": restarted}) is None
    assert render.not_started({"status": {"phase": "Failed"}}) is None


def test_lines_are_prefixed_only_when_several_pods_are_read() -> None:
    assert render.prefix_line("p-0", "step 1", several=False) == "step 1"
    assert render.prefix_line("p-0", "step 1", several=True) == "[p-0] step 1"


# --------------------------------------------------------------------------- dashboard, suspend


def test_port_forward_command_targets_the_service_on_loopback() -> None:
    assert render.port_forward_command("kubectl", "ml", "topics-ray", 8265) == [
        "kubectl", "--namespace", "ml", "port-forward", "--address", "127.0.0.1",
        "svc/topics-ray", "8265:8265",
    ]  # fmt: skip
    command = render.port_forward_command(
        "/bin/kubectl", "ml", "topics-ray", 9000, kubeconfig="/k", context="prod"
    )
    assert command[:5] == ["/bin/kubectl", "--kubeconfig", "/k", "--context", "prod"]
    assert command[-1] == "9000:8265"


def test_suspend_is_a_merge_patch_of_the_run_policy() -> None:
    assert render.suspend_patch(True) == {"spec": {"runPolicy": {"suspend": True}}}
    assert render.suspend_patch(False) == {"spec": {"runPolicy": {"suspend": False}}}
    assert render.is_suspended(job(runPolicy={"suspend": True}))
    assert not render.is_suspended(job(runPolicy={}))
    assert not render.is_suspended(job())
