"""reconcile() is pure: job + children + store facts + now in, actions + status + events out."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from ulmfit_operator.children import Child, ChildPhase, Cluster
from ulmfit_operator.policy import JobPolicy
from ulmfit_operator.reconcile import (
    CreateObject,
    Decision,
    DeleteChild,
    DeleteJob,
    FinalCheckpoint,
    NeedStore,
    Observation,
    StopChild,
    final_checkpoint,
    reconcile,
)
from ulmfit_operator.settings import OperatorSettings
from ulmfit_operator.status import format_time
from ulmfit_trainer.records import EvaluationSummary, StageProgress, numeric_values

pytestmark = pytest.mark.timeout(60)

CREATED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
NOW = CREATED + timedelta(minutes=5)
UID = "0b7a6c1e-uid"
S3 = {"endpoint": "127.0.0.1:9000", "bucket": "ulmfit-test"}


def job(
    spec: Mapping[str, Any] | None = None,
    status: Mapping[str, Any] | None = None,
    *,
    name: str = "topics",
    generation: int = 1,
    new: bool = False,
) -> dict[str, Any]:
    """A ULMFiTJob; without `status`, one the operator has seen before (its status holds an
    `observedGeneration`), unless `new`: a job as applied, with no status at all (whose first
    reconcile skips the store)."""
    base: dict[str, Any] = {"storage": {"s3": dict(S3), "credentialsSecretRef": "s3-keys"}}
    for key, value in (spec or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    body: dict[str, Any] = {
        "apiVersion": "ulmfit.io/v1alpha1",
        "kind": "ULMFiTJob",
        "metadata": {
            "name": name,
            "namespace": "team",
            "uid": UID,
            "generation": generation,
            "resourceVersion": "100",
            "creationTimestamp": format_time(CREATED),
        },
        "spec": base,
    }
    if status is not None:
        body["status"] = copy.deepcopy(dict(status))
    elif not new:
        body["status"] = {"observedGeneration": generation}
    return body


def child(
    stage: str,
    attempt: int,
    phase: ChildPhase = ChildPhase.RUNNING,
    *,
    job_name: str = "topics",
    created: datetime | None = None,
    message: str = "",
    stopped: str | None = None,
    owner: str = UID,
    deleting: bool = False,
) -> Child:
    kind = "Job" if stage in ("evaluate", "tune") else "PyTorchJob"
    return Child(
        name=f"{job_name}-{stage}-a{attempt}",
        namespace="team",
        api_version="batch/v1" if kind == "Job" else "kubeflow.org/v1",
        kind=kind,
        job=job_name,
        stage=stage,
        attempt=attempt,
        owner_uid=owner,
        phase=phase,
        message=message,
        created=created or CREATED + timedelta(seconds=10),
        deleting=deleting,
        stopped=stopped,
        resource_version="7",
    )


def progress(stage: str, at: datetime = NOW, **fields: Any) -> StageProgress:
    """A running attempt's `progress.json`, as the store reads it back."""
    return StageProgress(stage=stage, state="running", updated_at=format_time(at), **fields)


def evaluation(accuracy: float = 0.91, baseline: float = 0.42) -> dict[str, float]:
    """The evaluate stage's metrics, as it records them with its final checkpoint."""
    summary = EvaluationSummary(
        accuracy=accuracy,
        macroF1=0.88,
        majority_baseline_accuracy=baseline,
        expected_calibration_error=0.05,
        test_examples=200.0,
    )
    return summary.to_wire()


def final(stage: str, metrics: Mapping[str, float] | None = None, **kw: Any) -> FinalCheckpoint:
    return FinalCheckpoint(
        uri=f"s3://ulmfit-test/ulmfit/team/topics/{stage}/final",
        created_at=kw.pop("created_at", CREATED + timedelta(minutes=1)),
        metrics=dict(metrics or {}),
        **kw,
    )


class Store:
    """Answers NeedStore requests and remembers which were asked."""

    def __init__(
        self,
        finals: Mapping[str, FinalCheckpoint] | None = None,
        progress: Mapping[str, StageProgress] | None = None,
    ):
        self.finals = dict(finals or {})
        self.progress = dict(progress or {})
        self.asked: list[tuple[str, str]] = []

    def decide(
        self,
        body: Mapping[str, Any],
        children: Sequence[Child] = (),
        now: datetime = NOW,
        rayjob_available: bool = False,
        policy: JobPolicy | None = None,
        cluster: Cluster | None = None,
    ) -> Decision:
        observation = Observation()
        options: dict[str, Any] = {"cluster": cluster or Cluster(rayjob=rayjob_available)}
        if policy is not None:
            options["policy"] = policy
        for _ in range(40):
            result = reconcile(body, children, observation, now, **options)
            if not isinstance(result, NeedStore):
                return result
            self.asked.append((result.stage, result.what))
            meta = body["metadata"]
            assert result.run == f"team/{meta['name']}/{meta['uid']}"
            assert result.s3 is not None and result.s3.bucket == S3["bucket"]
            if result.what == "checkpoint":
                observation = observation.with_checkpoint(
                    result.stage, self.finals.get(result.stage)
                )
            else:
                observation = observation.with_progress(
                    result.stage, self.progress.get(result.stage)
                )
        raise AssertionError("reconcile kept asking for store facts")


def decide(
    body: Mapping[str, Any],
    children: Sequence[Child] = (),
    policy: JobPolicy | None = None,
    **store: Any,
) -> Decision:
    return Store(**store).decide(body, children, policy=policy)


def after(body: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """The job as it looks once the decision's status patch landed."""
    updated = copy.deepcopy(body)
    if decision.status is not None:
        updated["status"] = copy.deepcopy(decision.status)
    return updated


def condition(status: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), None)


def stage_entry(status: Mapping[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in status["stages"] if s["name"] == name)


def creates(decision: Decision) -> list[CreateObject]:
    return [a for a in decision.actions if isinstance(a, CreateObject)]


# ----------------------------------------------------------------------------------- validation


def test_operator_invalid_spec_fails_once_with_a_warning_naming_the_field() -> None:
    body = job({"model": {"architecture": {"hiddenSize": 100, "heads": 3}}})
    first = decide(body)
    assert first.actions == ()
    assert first.state == "Failed"
    failed = condition(first.status or {}, "Failed")
    assert failed is not None and failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    assert "spec.model.architecture" in failed["message"]
    assert "hiddenSize 100 must be a multiple of heads 3" in failed["message"]
    [event] = first.events
    assert event.type == "Warning" and event.reason == "InvalidSpec"
    assert "spec.model.architecture" in event.message
    # No retry, no second event: the same job again changes nothing.
    again = decide(after(body, first))
    assert again.status is None and again.events == () and again.actions == ()


def test_operator_requires_s3_storage() -> None:
    body = job()
    body["spec"]["storage"] = {}
    decision = decide(body)
    failed = condition(decision.status or {}, "Failed")
    assert failed is not None and failed["reason"] == "InvalidSpec"
    assert "spec.storage.s3" in failed["message"]
    assert not creates(decision)


def test_operator_invalid_endpoint_is_reported_with_its_value() -> None:
    body = job({"storage": {"s3": {"endpoint": "ftp://store", "bucket": "ulmfit-test"}}})
    decision = decide(body)
    failed = condition(decision.status or {}, "Failed")
    assert failed is not None and "spec.storage.s3.endpoint" in failed["message"]
    assert "ftp://store" in failed["message"]


# ---------------------------------------------------------- what the operator's settings allow


def policy(endpoints: str = "*", images: str = "*") -> JobPolicy:
    """The policy of an operator started with these --allowed-* flags."""
    return OperatorSettings(
        allowed_s3_endpoints=endpoints, allowed_trainer_images=images
    ).job_policy()


def test_operator_refuses_an_s3_endpoint_it_does_not_allow_before_reading_it() -> None:
    body = job({"storage": {"s3": {"endpoint": "http://169.254.169.254", "bucket": "ulmfit-test"}}})
    store = Store()
    first = store.decide(body, policy=policy("http://minio.minio.svc:9000,s3.example.com"))
    # Refused before any store fact was asked for (nothing contacted) and nothing created.
    assert store.asked == []
    assert first.actions == () and first.state == "Failed"
    failed = condition(first.status or {}, "Failed")
    assert failed is not None and failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    message = failed["message"]
    assert message.startswith("spec.storage.s3.endpoint: ")
    assert "'http://169.254.169.254'" in message
    assert "allows only the S3 endpoints http://minio.minio.svc:9000, s3.example.com" in message
    assert "http://169.254.169.254:80 is not one of them" in message
    assert "--allowed-s3-endpoints" in message and "allowedS3Endpoints" in message
    [event] = first.events
    assert event.type == "Warning" and event.reason == "InvalidSpec" and event.message == message
    # No retry, no second event.
    again = store.decide(after(body, first), policy=policy("http://minio.minio.svc:9000"))
    assert again.status is None and again.events == () and again.actions == ()
    assert store.asked == []


def test_operator_allows_no_s3_endpoint_with_an_empty_list() -> None:
    decision = decide(job(), policy=policy(""))
    failed = condition(decision.status or {}, "Failed")
    assert failed is not None and failed["reason"] == "InvalidSpec"
    assert "the operator allows no S3 endpoint" in failed["message"]


@pytest.mark.parametrize(
    ("allowed", "endpoint", "secure", "ok"),
    [
        # The scheme's default port, the host's case, a trailing slash: the same endpoint.
        ("http://minio:9000", "minio:9000", None, True),
        ("http://minio:9000", "HTTP://MINIO:9000/", None, True),
        ("minio:80", "http://minio", None, True),
        ("https://s3.example.com", "https://s3.example.com:443", None, True),
        ("https://s3.example.com:443", "s3.example.com", True, True),
        # An entry without a scheme allows either, at the scheme's default port.
        ("s3.example.com", "https://s3.example.com", None, True),
        ("s3.example.com", "http://s3.example.com:80", None, True),
        ("s3.example.com", "s3.example.com:9000", None, False),
        ("[::1]:9000", "http://[::1]:9000", None, True),
        # What the client would connect with decides: `secure` over the URL's scheme.
        ("http://minio:9000", "https://minio:9000", None, False),
        ("http://minio:9000", "minio:9000", True, False),
        ("https://minio:9000", "http://minio:9000", True, True),
        # Another host or port, a look-alike, a user part: refused.
        ("http://minio:9000", "http://minio:9001", None, False),
        ("http://minio:9000", "http://minio.evil.example:9000", None, False),
        ("http://minio:9000", "http://minio:9000@evil.example:9000", None, False),
        ("http://minio:9000", "http://user@minio:9000", None, False),
        ("minio", "minio.", None, False),
        ("*", "http://anything.example:1234", None, True),
    ],
)
def test_operator_compares_s3_endpoints_by_scheme_host_and_port(
    allowed: str, endpoint: str, secure: bool | None, ok: bool
) -> None:
    s3: dict[str, Any] = {"endpoint": endpoint, "bucket": "ulmfit-test"}
    if secure is not None:
        s3["secure"] = secure
    store = Store()
    decision = store.decide(job({"storage": {"s3": s3}}), policy=policy(allowed))
    failed = condition(decision.status or {}, "Failed")
    if ok:
        assert failed is None, failed
        assert store.asked and creates(decision)
    else:
        assert failed is not None and failed["reason"] == "InvalidSpec"
        assert "spec.storage.s3.endpoint" in failed["message"]
        assert store.asked == [] and decision.actions == ()


def test_operator_refuses_a_trainer_image_it_does_not_allow() -> None:
    body = job({"resources": {"image": "docker.io/attacker/miner:latest"}})
    store = Store()
    decision = store.decide(body, policy=OperatorSettings().job_policy())
    assert store.asked == [] and decision.actions == ()
    failed = condition(decision.status or {}, "Failed")
    assert failed is not None and failed["reason"] == "InvalidSpec"
    message = failed["message"]
    assert message.startswith("spec.resources.image: ")
    assert "'docker.io/attacker/miner:latest'" in message
    assert "ghcr.io/ulmfit-operator/trainer[:TAG][@DIGEST]" in message
    assert "--allowed-trainer-images" in message and "allowedTrainerImages" in message


def test_operator_names_every_refused_field_at_once() -> None:
    body = job(
        {
            "storage": {"s3": {"endpoint": "evil.example:9000", "bucket": "ulmfit-test"}},
            "resources": {"image": "evil.example/trainer:1"},
        }
    )
    decision = decide(body, policy=policy("minio:9000", "ghcr.io/ulmfit-operator/trainer"))
    failed = condition(decision.status or {}, "Failed")
    assert failed is not None
    assert "spec.storage.s3.endpoint" in failed["message"]
    assert "spec.resources.image" in failed["message"]


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("patterns", "image", "ok"),
    [
        # A repository: any tag and/or digest of it, nothing else.
        ("ghcr.io/ulmfit-operator/trainer", "ghcr.io/ulmfit-operator/trainer:0.1.0", True),
        ("ghcr.io/ulmfit-operator/trainer", "ghcr.io/ulmfit-operator/trainer", True),
        ("ghcr.io/ulmfit-operator/trainer", f"ghcr.io/ulmfit-operator/trainer@{DIGEST}", True),
        ("ghcr.io/ulmfit-operator/trainer", f"ghcr.io/ulmfit-operator/trainer:1@{DIGEST}", True),
        ("ghcr.io/ulmfit-operator/trainer", "ghcr.io/ulmfit-operator/trainer-evil:1", False),
        ("ghcr.io/ulmfit-operator/trainer", "ghcr.io/ulmfit-operator/trainer/x:1", False),
        ("ghcr.io/ulmfit-operator/trainer", "ghcr.io/ulmfit-operator/trainer:a/b", False),
        ("ghcr.io/ulmfit-operator/trainer", "ghcr.io/ulmfit-operator/trainer@sha256:zz", False),
        ("ghcr.io/ulmfit-operator/trainer", "evil.io/ghcr.io/ulmfit-operator/trainer:1", False),
        ("ghcr.io/ulmfit-operator/trainer", "ghcrXio/ulmfit-operator/trainer:1", False),
        # A prefix.
        ("registry.example.com/ml/*", "registry.example.com/ml/trainer:2", True),
        ("registry.example.com/ml/*", "registry.example.com/mlx/trainer:2", False),
        ("*", "anything:at-all", True),
        # An exact image (a tag or digest given), with a registry port.
        ("localhost:5000/trainer:dev", "localhost:5000/trainer:dev", True),
        ("localhost:5000/trainer:dev", "localhost:5000/trainer:dev2", False),
        # Several: any one.
        ("a.io/x,b.io/y:1", "b.io/y:1", True),
    ],
)
def test_operator_matches_trainer_images_against_the_patterns(
    patterns: str, image: str, ok: bool
) -> None:
    decision = decide(job({"resources": {"image": image}}), policy=policy(images=patterns))
    failed = condition(decision.status or {}, "Failed")
    assert (failed is None) == ok, failed
    if ok:
        [body] = [c.body for c in creates(decision) if c.body["kind"] == "PyTorchJob"]
        containers = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        assert containers["containers"][0]["image"] == image


def test_operator_default_policy_runs_the_default_trainer_image() -> None:
    decision = decide(job(), policy=OperatorSettings().job_policy())
    assert condition(decision.status or {}, "Failed") is None
    assert [c.body["kind"] for c in creates(decision)] == [
        "NetworkPolicy",
        "ConfigMap",
        "PyTorchJob",
    ]


def test_operator_fences_the_pods_before_the_first_one() -> None:
    settings = OperatorSettings(job_s3_cidrs="10.0.0.0/8", ray_operator_pods="app=kuberay,tier=ops")
    body = job({"storage": {"s3": {**S3, "endpoint": "https://s3.internal"}}})
    first = decide(body, policy=settings.job_policy())
    [fence] = [c.body for c in creates(first) if c.body["kind"] == "NetworkPolicy"]
    assert fence["metadata"]["name"] == f"{body['metadata']['name']}-pods"
    # The S3 rule carries the job's endpoint port (https: 443) at the operator's networks.
    [s3_rule] = [r for r in fence["spec"]["egress"] if any("ipBlock" in p for p in r.get("to", []))]
    assert s3_rule == {
        "to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
        "ports": [{"port": 443, "protocol": "TCP"}],
    }
    operator_peer = fence["spec"]["ingress"][1]["from"][0]["podSelector"]["matchLabels"]
    assert operator_peer == {"app": "kuberay", "tier": "ops"}
    # With --job-network-policy none, no policy.
    unfenced = decide(body, policy=OperatorSettings(job_network_policy="none").job_policy())
    assert "NetworkPolicy" not in [c.body["kind"] for c in creates(unfenced)]


def test_operator_finished_job_keeps_its_outcome_under_a_narrower_policy() -> None:
    body = job()
    store = Store(finals={s: final(s) for s in ("finetune", "classifier", "evaluate")})
    done = store.decide(body)
    assert done.state == "Succeeded"
    later = decide(after(body, done), policy=policy("elsewhere:9000", "elsewhere/trainer"))
    assert later.state == "Succeeded" and later.status is None and later.events == ()


def test_operator_job_being_deleted_is_left_alone() -> None:
    body = job()
    body["metadata"]["deletionTimestamp"] = format_time(NOW)
    decision = decide(body, [child("finetune", 1)])
    assert decision.actions == () and decision.status is None


# ---------------------------------------------------------------------------------- first stage


def test_operator_new_job_gets_one_child_for_its_first_stage() -> None:
    store = Store()
    decision = store.decide(job())
    # The store is read only as far as needed: the first stage is not done, so nothing else.
    assert store.asked == [("finetune", "checkpoint")]
    config_map, pytorch_job = creates(decision)
    assert config_map.kind == "ConfigMap" and config_map.name == "topics-finetune-a1-config"
    assert pytorch_job.kind == "PyTorchJob" and pytorch_job.name == "topics-finetune-a1"
    status = decision.status or {}
    assert status["currentStage"] == "finetune"
    assert [(s["name"], s["state"]) for s in status["stages"]] == [
        ("pretrain", "Skipped"),
        ("finetune", "Pending"),
        ("classifier", "Pending"),
        ("evaluate", "Pending"),
    ]
    assert stage_entry(status, "finetune")["attempts"] == 1
    running = condition(status, "Running")
    assert running is not None and running["status"] == "True"
    assert running["observedGeneration"] == 1
    assert status["observedGeneration"] == 1
    [event] = decision.events
    assert event.reason == "StageStarted" and "topics-finetune-a1" in event.message


def test_operator_brand_new_job_starts_without_reading_the_store() -> None:
    """A job as applied (no status, no child) has nothing under its run path, which carries its
    UID: its first reconcile creates the first attempt without a store read. From then on (a
    status, or a child) the store is read as before."""
    store = Store()
    first = store.decide(job(new=True))
    assert store.asked == []
    assert [(c.kind, c.name) for c in creates(first)] == [
        ("ConfigMap", "topics-finetune-a1-config"),
        ("PyTorchJob", "topics-finetune-a1"),
    ]
    assert stage_entry(first.status or {}, "finetune")["attempts"] == 1
    later = Store()
    later.decide(after(job(new=True), first), [child("finetune", 1)])
    assert later.asked[0] == ("finetune", "checkpoint")


def test_operator_skipping_the_store_for_a_brand_new_job_loses_nothing() -> None:
    """Should the store hold a final checkpoint all the same (the job's status wiped by hand),
    the skipped read costs one attempt's start, nothing else: the attempt is made (its trainer
    finds the stage finished and exits at once), and the next reconcile, which sees that child,
    reads the final checkpoint, records it, and moves on to the next stage."""
    store = Store(finals={"finetune": final("finetune")})
    first = store.decide(job(new=True))
    assert store.asked == [] and [c.name for c in creates(first)][-1] == "topics-finetune-a1"
    body = after(job(new=True), first)
    second = store.decide(body, [child("finetune", 1, ChildPhase.SUCCEEDED)])
    assert ("finetune", "checkpoint") in store.asked
    entry = stage_entry(second.status or {}, "finetune")
    assert entry["state"] == "Succeeded" and entry["checkpoint"] == final("finetune").uri
    assert [c.name for c in creates(second)][-1] == "topics-classifier-a1"


def test_operator_reconcile_is_idempotent() -> None:
    body = job()
    first = decide(body)
    created = [child("finetune", 1, ChildPhase.PENDING)]
    second = decide(after(body, first), created)
    assert second.actions == ()
    assert second.status is None
    assert second.events == ()


def test_operator_no_duplicate_while_the_child_is_not_yet_seen() -> None:
    # The operator restarted after creating a1 but before writing status: it asks for a1 again
    # (a deterministic name, so the API answers 409) instead of a second child.
    first = decide(job())
    again = decide(job())
    assert [a.name for a in creates(again)] == [a.name for a in creates(first)]


def test_operator_running_child_shows_progress() -> None:
    body = after(job(), decide(job()))
    report = progress(
        "finetune", NOW - timedelta(seconds=5), phase=2, total_phases=4, step=63, total_steps=100
    )
    decision = decide(body, [child("finetune", 1)], progress={"finetune": report})
    status = decision.status or {}
    assert status["progress"] == "finetune phase 2/4, 63%"
    assert stage_entry(status, "finetune")["state"] == "Running"
    assert decision.requeue_after is not None and 0 < decision.requeue_after <= 1800


def test_operator_lasttransitiontime_moves_only_on_flips() -> None:
    body = after(job(), decide(job()))
    running = condition(body["status"], "Running")
    assert running is not None
    later = Store().decide(body, [child("finetune", 1)], now=NOW + timedelta(minutes=3))
    new_running = condition(later.status or body["status"], "Running")
    assert new_running is not None
    assert new_running["lastTransitionTime"] == running["lastTransitionTime"]


# ---------------------------------------------------------------------------------- transitions


def test_operator_next_stage_starts_from_the_previous_final_checkpoint() -> None:
    body = after(job(), decide(job()))
    done = final("finetune", {"perplexity": 31.5, "loss": 3.45})
    decision = decide(body, [child("finetune", 1, ChildPhase.SUCCEEDED)], finals={"finetune": done})
    status = decision.status or {}
    entry = stage_entry(status, "finetune")
    assert entry["state"] == "Succeeded"
    assert entry["checkpoint"] == done.uri
    assert entry["metrics"] == {"perplexity": 31.5, "loss": 3.45}
    assert status["currentStage"] == "classifier"
    _, classifier_job = creates(decision)
    assert classifier_job.name == "topics-classifier-a1"
    annotations = classifier_job.body["metadata"]["annotations"]
    assert annotations["ulmfit.io/init-checkpoint"] == done.uri
    reasons = [e.reason for e in decision.events]
    assert reasons == ["StageSucceeded", "StageStarted"]
    assert [stage for stage, _ in decision.completed_stages] == ["finetune"]


def test_operator_walks_every_stage_to_success() -> None:
    spec = {"stages": {"pretrain": {"enabled": True}}}
    body = job(spec)
    finals: dict[str, FinalCheckpoint] = {}
    children: list[Child] = []
    seen_stages = []
    for stage in ("pretrain", "finetune", "classifier", "evaluate"):
        store = Store(finals=finals)
        decision = store.decide(body, children)
        made = creates(decision)
        assert [a.kind for a in made] == [
            "ConfigMap",
            "Job" if stage == "evaluate" else "PyTorchJob",
        ]
        assert made[1].name == f"topics-{stage}-a1"
        seen_stages.append(stage)
        body = after(body, decision)
        children.append(child(stage, 1, ChildPhase.SUCCEEDED))
        finals[stage] = final(
            stage,
            evaluation() if stage == "evaluate" else {"loss": 1.0},
            model_uri="s3://ulmfit-test/ulmfit/team/topics/model" if stage == "evaluate" else None,
        )
    store = Store(finals=finals)
    decision = store.decide(body, children)
    # Stages already recorded as Succeeded are not read again; only the last one is.
    assert store.asked == [("evaluate", "checkpoint")]
    status = decision.status or {}
    assert decision.state == "Succeeded" and not decision.actions
    succeeded = condition(status, "Succeeded")
    assert succeeded is not None and succeeded["status"] == "True"
    running = condition(status, "Running")
    assert running is not None and running["status"] == "False"
    assert status["result"] == {
        "modelUri": "s3://ulmfit-test/ulmfit/team/topics/model",
        "testMetrics": evaluation(),
    }
    assert status["progress"] == "Succeeded"
    assert all(s["state"] == "Succeeded" for s in status["stages"])
    assert [e.reason for e in decision.events] == ["StageSucceeded", "Succeeded"]
    assert "test accuracy 0.9100 (majority baseline 0.4200)" in decision.events[-1].message
    assert seen_stages == ["pretrain", "finetune", "classifier", "evaluate"]
    finished = decide(after(body, decision), children, finals=finals)
    assert finished.status is None and finished.actions == () and finished.events == ()


def test_operator_reads_the_store_only_under_this_job_instances_path() -> None:
    """An earlier job of the same name wrote under its own UID: this one never sees it, however
    its clock compares (a final made 'before' the job, by a slow clock, still counts)."""
    body = job()
    asked = reconcile(body, [], Observation(), NOW)
    assert isinstance(asked, NeedStore) and asked.run == f"team/topics/{UID}"
    again = copy.deepcopy(body)
    again["metadata"]["uid"] = "another-uid"
    asked_again = reconcile(again, [], Observation(), NOW)
    assert isinstance(asked_again, NeedStore) and asked_again.run == "team/topics/another-uid"
    skewed = final("finetune", created_at=CREATED - timedelta(minutes=1))
    decision = decide(body, finals={"finetune": skewed})
    assert (decision.status or {})["currentStage"] == "classifier"


def test_operator_status_is_a_cache_that_can_be_recomputed() -> None:
    # No status at all, but the cluster and the store know: finetune is done, classifier a1
    # failed and a2 runs. The operator picks up exactly there.
    children = [
        child("finetune", 1, ChildPhase.SUCCEEDED),
        child("classifier", 1, ChildPhase.FAILED, message="Error: exit 1"),
        child("classifier", 2, ChildPhase.RUNNING),
    ]
    decision = decide(job(), children, finals={"finetune": final("finetune")})
    assert not creates(decision)
    status = decision.status or {}
    assert status["currentStage"] == "classifier"
    entry = stage_entry(status, "classifier")
    assert entry["attempts"] == 2 and entry["failures"] == 1 and entry["state"] == "Running"
    assert stage_entry(status, "finetune")["state"] == "Succeeded"


def test_operator_ignores_children_of_another_owner() -> None:
    stranger = child("finetune", 1, owner="someone-else")
    decision = decide(job(), [stranger])
    assert [a.name for a in creates(decision)][-1] == "topics-finetune-a1"
    assert not [a for a in decision.actions if isinstance(a, DeleteChild)]


# -------------------------------------------------------------------------------------- retries


def test_operator_failed_attempt_is_replaced_by_the_next() -> None:
    body = after(job(), decide(job()))
    failed = child("finetune", 1, ChildPhase.FAILED, message="OOMKilled: out of memory")
    decision = decide(body, [failed])
    made = creates(decision)
    assert made[-1].name == "topics-finetune-a2"
    entry = stage_entry(decision.status or {}, "finetune")
    assert entry["attempts"] == 2 and entry["failures"] == 1
    assert "OOMKilled" in entry["message"]
    assert "retry 1 of 3" in decision.events[-1].message


def test_operator_success_without_a_final_checkpoint_is_a_failed_attempt() -> None:
    body = after(job(), decide(job()))
    decision = decide(body, [child("finetune", 1, ChildPhase.SUCCEEDED)])
    assert creates(decision)[-1].name == "topics-finetune-a2"
    entry = stage_entry(decision.status or {}, "finetune")
    assert entry["failures"] == 1
    assert "without a final checkpoint" in entry["message"]


def test_operator_backoff_limit_fails_the_job_with_the_reason() -> None:
    body = job({"runPolicy": {"backoffLimit": 1}})
    children = [
        child("finetune", 1, ChildPhase.FAILED, message="BackoffLimitExceeded: exit 137"),
        child("finetune", 2, ChildPhase.SUCCEEDED),
    ]
    decision = decide(body, children)
    assert not creates(decision)
    status = decision.status or {}
    failed = condition(status, "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"
    assert "finetune failed 2 times" in failed["message"]
    assert stage_entry(status, "finetune")["state"] == "Failed"
    assert status["progress"] == "Failed: BackoffLimitExceeded"
    warning = decision.events[-1]
    assert warning.type == "Warning" and warning.reason == "BackoffLimitExceeded"
    # Finished: nothing more happens, however often it is looked at.
    again = decide(after(body, decision), children)
    assert again.status is None and again.actions == () and again.events == ()


def test_operator_stalled_attempt_is_stopped_and_counted() -> None:
    body = after(job(), decide(job()))
    started = NOW - timedelta(hours=2)
    running = child("finetune", 1, created=started)
    report = progress("finetune", NOW - timedelta(hours=1), step=5)
    decision = decide(body, [running], progress={"finetune": report})
    [stop] = [a for a in decision.actions if isinstance(a, StopChild)]
    assert stop.child.name == "topics-finetune-a1" and stop.reason == "ProgressDeadlineExceeded"
    assert stop.resource_version == "7"
    assert not creates(decision)  # the next attempt comes once the stop is seen
    assert stage_entry(decision.status or {}, "finetune")["failures"] == 1
    assert any(e.reason == "ProgressDeadlineExceeded" for e in decision.events)
    stopped = child("finetune", 1, ChildPhase.SUSPENDED, created=started, stopped="x")
    nxt = decide(after(body, decision), [stopped])
    assert creates(nxt)[-1].name == "topics-finetune-a2"


def test_operator_progress_from_an_earlier_attempt_does_not_count() -> None:
    body = after(job(), decide(job()))
    created = NOW - timedelta(minutes=10)
    report = progress("finetune", created - timedelta(hours=3))
    decision = decide(body, [child("finetune", 2, created=created)], progress={"finetune": report})
    assert not [a for a in decision.actions if isinstance(a, StopChild)]
    assert decision.requeue_after == pytest.approx(1800 - 600, abs=1)


def test_operator_keeps_exactly_one_active_attempt() -> None:
    body = after(job(), decide(job()))
    decision = decide(body, [child("finetune", 1), child("finetune", 2)])
    deletes = [a.child.name for a in decision.actions if isinstance(a, DeleteChild)]
    assert deletes == ["topics-finetune-a1"]
    assert not creates(decision)


# ------------------------------------------------------------------------------------ run policy


def test_operator_suspend_deletes_children_and_resume_starts_again() -> None:
    body = after(job(), decide(job()))
    body["spec"]["runPolicy"] = {"suspend": True}
    suspended = decide(body, [child("finetune", 1)])
    assert [a.child.name for a in suspended.actions if isinstance(a, DeleteChild)] == [
        "topics-finetune-a1"
    ]
    assert not creates(suspended)
    status = suspended.status or {}
    flag = condition(status, "Suspended")
    assert flag is not None and flag["status"] == "True"
    running = condition(status, "Running")
    assert running is not None and running["status"] == "False"
    assert status["progress"] == "Suspended"
    assert suspended.state == "Suspended"
    assert [e.reason for e in suspended.events] == ["Suspended"]
    # While suspended nothing changes.
    body = after(body, suspended)
    assert decide(body).status is None
    # Resume: the Suspended condition flips, the deadline clock restarts, a child comes back.
    body["spec"]["runPolicy"] = {"suspend": False}
    resumed = Store().decide(body, [], now=NOW + timedelta(hours=1))
    status = resumed.status or {}
    flag = condition(status, "Suspended")
    assert flag is not None and flag["status"] == "False" and flag["reason"] == "Resumed"
    assert status["startTime"] == format_time(NOW + timedelta(hours=1))
    assert creates(resumed)[-1].name == "topics-finetune-a1"
    assert "Resumed" in [e.reason for e in resumed.events]


def test_operator_active_deadline_fails_the_job() -> None:
    body = after(job({"runPolicy": {"activeDeadlineSeconds": 60}}), decide(job()))
    early = Store().decide(body, [child("finetune", 1)], now=CREATED + timedelta(seconds=30))
    assert early.state == "Running"
    assert early.requeue_after == pytest.approx(30)
    late = Store().decide(body, [child("finetune", 1)], now=CREATED + timedelta(seconds=61))
    failed = condition(late.status or {}, "Failed")
    assert failed is not None and failed["reason"] == "DeadlineExceeded"
    assert [a.child.name for a in late.actions if isinstance(a, DeleteChild)] == [
        "topics-finetune-a1"
    ]
    assert late.events[-1].type == "Warning"


def test_operator_ttl_after_finished_deletes_the_job() -> None:
    body = job({"runPolicy": {"backoffLimit": 0, "ttlSecondsAfterFinished": 30}})
    failed = decide(body, [child("finetune", 1, ChildPhase.FAILED)])
    assert failed.requeue_after == 30
    body = after(body, failed)
    finished_at = NOW
    waiting = Store().decide(body, now=finished_at + timedelta(seconds=10))
    assert waiting.requeue_after == pytest.approx(20)
    assert not [a for a in waiting.actions if isinstance(a, DeleteJob)]
    due = Store().decide(body, now=finished_at + timedelta(seconds=31))
    assert [a for a in due.actions if isinstance(a, DeleteJob)]


# -------------------------------------------------------------------------------------- helpers


def test_operator_event_messages_stay_under_the_api_limit() -> None:
    body = job({"runPolicy": {"backoffLimit": 0}})
    failure = child("finetune", 1, ChildPhase.FAILED, message="x" * 5000)
    decision = decide(body, [failure])
    assert decision.events and all(len(e.message) < 1024 for e in decision.events)


def test_operator_final_checkpoint_keeps_only_finite_numeric_metrics() -> None:
    raw = {"accuracy": 0.9, "n": 10, "flag": True, "name": "x", "nan": float("nan"), "d": {}}
    assert numeric_values(raw) == {"accuracy": 0.9, "n": 10.0}
    checkpoint = final_checkpoint(
        "s3://b/p", "2026-03-01T12:01:00.000Z", {"metrics": raw, "modelUri": "s3://b/model"}
    )
    assert checkpoint.metrics == {"accuracy": 0.9, "n": 10.0}
    assert checkpoint.model_uri == "s3://b/model"
    assert checkpoint.created_at == CREATED + timedelta(minutes=1)
    # A meta that is not a stage result still marks the stage done, without its facts.
    odd = final_checkpoint("s3://b/p", "2026-03-01T12:01:00.000Z", {"metrics": "not a map"})
    assert odd.uri == "s3://b/p" and odd.metrics == {} and odd.model_uri is None


def test_operator_success_summary_names_the_majority_baseline_the_evaluate_stage_wrote() -> None:
    # What the evaluate stage commits: the summary numbers plus structured entries.
    written = {**evaluation(0.8125, 0.3125), "majorityBaseline": {"label": "a", "accuracy": 0.3}}
    evaluate = final_checkpoint(
        "s3://b/evaluate/final", format_time(NOW), {"metrics": written, "modelUri": "s3://m"}
    )
    finals = {stage: final(stage) for stage in ("finetune", "classifier")}
    decision = decide(job(), finals={**finals, "evaluate": evaluate})
    assert decision.state == "Succeeded"
    succeeded = condition(decision.status or {}, "Succeeded")
    assert succeeded is not None
    assert succeeded["message"].endswith("; test accuracy 0.8125 (majority baseline 0.3125)")
    assert decision.events[-1].message == succeeded["message"]
    assert (decision.status or {})["result"]["testMetrics"]["majorityBaselineAccuracy"] == 0.3125


# ------------------------------------------------------------------ the DAG: cotrain and tune

COTRAIN = {
    "models": [
        {"name": "rules", "rules": [{"label": "a", "keywords": ["alpha"]}]},
        {"name": "tail", "rules": [{"label": "b", "keywords": ["beta"]}]},
    ],
    "rounds": 1,
}
TUNE = {"space": {"learningRate": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}


def child_kinds(decision: Decision) -> dict[str, str]:
    return {a.name: a.kind for a in creates(decision) if a.kind != "ConfigMap"}


def test_operator_cotrain_models_of_a_round_start_together() -> None:
    body = job({"stages": {"cotrain": COTRAIN}})
    finals = {"finetune": final("finetune")}
    decision = decide(body, finals=finals)
    assert child_kinds(decision) == {
        "topics-cotrain-rules-a1": "PyTorchJob",
        "topics-cotrain-tail-a1": "PyTorchJob",
    }
    configs = [a for a in creates(decision) if a.kind == "ConfigMap"]
    assert len(configs) == 2
    for made in creates(decision):
        if made.kind == "PyTorchJob":
            command = made.body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
                "containers"
            ][0]["command"]
            assert command[-4:-2] == ["ulmfit_trainer", "cotrain"]
            annotations = made.body["metadata"]["annotations"]
            assert annotations["ulmfit.io/init-checkpoint"] == finals["finetune"].uri
    status = decision.status or {}
    assert status["currentStage"] == "cotrain-rules,cotrain-tail"
    assert [(s["name"], s["state"]) for s in status["stages"]] == [
        ("pretrain", "Skipped"),
        ("finetune", "Succeeded"),
        ("cotrain-rules", "Pending"),
        ("cotrain-tail", "Pending"),
        ("classifier", "Pending"),
        ("evaluate", "Pending"),
    ]
    assert stage_entry(status, "cotrain-tail")["kind"] == "cotrain"
    assert [e.reason for e in decision.events].count("StageStarted") == 2
    # One finished, the other still running: no new child; the classifier waits for both.
    body = after(body, decision)
    running = [child("cotrain-rules", 1, ChildPhase.SUCCEEDED), child("cotrain-tail", 1)]
    store = Store(
        finals={**finals, "cotrain-rules": final("cotrain-rules")},
        progress={"cotrain-tail": progress("cotrain-tail", step=5, total_steps=10)},
    )
    waiting = store.decide(body, running)
    assert not creates(waiting)
    assert ("classifier", "checkpoint") not in store.asked
    status = waiting.status or {}
    assert stage_entry(status, "cotrain-rules")["state"] == "Succeeded"
    assert stage_entry(status, "cotrain-tail")["state"] == "Running"
    assert status["progress"] == "cotrain-tail 50%"
    # Both done: the classifier starts, trained on their pseudo-labels.
    body = after(body, waiting)
    store = Store(
        finals={**finals, "cotrain-rules": final("cotrain-rules"), "cotrain-tail": final("t")}
    )
    moving = store.decide(body, [*running[:1], child("cotrain-tail", 1, ChildPhase.SUCCEEDED)])
    assert child_kinds(moving) == {"topics-classifier-a1": "PyTorchJob"}
    [config_map] = [a for a in creates(moving) if a.kind == "ConfigMap"]
    config = json.loads(config_map.body["data"]["stage.json"])
    assert config["pseudoLabelsFrom"] == ["cotrain-rules", "cotrain-tail"]


def test_operator_backoff_is_counted_per_parallel_stage() -> None:
    body = job({"stages": {"cotrain": COTRAIN}, "runPolicy": {"backoffLimit": 1}})
    body = after(body, decide(body, finals={"finetune": final("finetune")}))
    finals = {"finetune": final("finetune")}
    # Each model failed once: both get a second attempt, independently.
    failed_once = [
        child("cotrain-rules", 1, ChildPhase.FAILED, message="OOMKilled"),
        child("cotrain-tail", 1, ChildPhase.FAILED),
    ]
    retry = decide(body, failed_once, finals=finals)
    assert child_kinds(retry) == {
        "topics-cotrain-rules-a2": "PyTorchJob",
        "topics-cotrain-tail-a2": "PyTorchJob",
    }
    status = retry.status or {}
    assert stage_entry(status, "cotrain-rules")["failures"] == 1
    assert "OOMKilled" in stage_entry(status, "cotrain-rules")["message"]
    # rules fails again (2 > backoffLimit 1): the job fails, naming it; tail's child is deleted.
    body = after(body, retry)
    children = [
        *failed_once,
        child("cotrain-rules", 2, ChildPhase.FAILED),
        child("cotrain-tail", 2),
    ]
    store = Store(finals=finals, progress={"cotrain-tail": progress("cotrain-tail")})
    failed = store.decide(body, children)
    status = failed.status or {}
    flag = condition(status, "Failed")
    assert flag is not None and flag["reason"] == "BackoffLimitExceeded"
    assert "stage cotrain-rules failed 2 times" in flag["message"]
    assert stage_entry(status, "cotrain-rules")["state"] == "Failed"
    assert stage_entry(status, "cotrain-tail")["state"] == "Pending"
    assert [a.child.name for a in failed.actions if isinstance(a, DeleteChild)] == [
        "topics-cotrain-tail-a2"
    ]


def test_operator_tune_stage_gets_a_pod_and_a_dashboard_service() -> None:
    body = job({"stages": {"tune": TUNE}})
    decision = decide(body, finals={"finetune": final("finetune")})
    assert child_kinds(decision) == {
        "topics-tune-a1": "Job",
        "topics-tune-dashboard": "Service",
    }
    status = decision.status or {}
    assert status["tune"] == {
        "backend": "pod",
        "service": "topics-tune-dashboard",
        # The pod's dashboard listens on its loopback: a port-forward is the way in.
        "dashboard": "http://localhost:8265",
        "portForward": "kubectl port-forward -n team svc/topics-tune-dashboard 8265:8265",
    }
    [started] = [e for e in decision.events if e.reason == "StageStarted"]
    assert "kubectl port-forward -n team svc/topics-tune-dashboard 8265:8265" in started.message
    assert "svc:8265" not in started.message
    # With KubeRay installed, `auto` makes a RayJob (whose head serves the cluster); an explicit
    # `pod` does not.
    rayjob = Store(finals={"finetune": final("finetune")}).decide(body, rayjob_available=True)
    assert child_kinds(rayjob) == {"topics-tune-a1": "RayJob", "topics-tune-dashboard": "Service"}
    assert (rayjob.status or {})["tune"]["dashboard"] == (
        "http://topics-tune-dashboard.team.svc:8265"
    )
    pod = job({"stages": {"tune": {**TUNE, "backend": "pod"}}})
    assert (
        "Job"
        in child_kinds(
            Store(finals={"finetune": final("finetune")}).decide(pod, rayjob_available=True)
        ).values()
    )


def test_operator_rayjob_backend_without_kuberay_fails_clearly() -> None:
    body = job({"stages": {"tune": {**TUNE, "backend": "rayjob"}}})
    decision = decide(body, finals={"finetune": final("finetune")})
    assert not creates(decision)
    flag = condition(decision.status or {}, "Failed")
    assert flag is not None and flag["reason"] == "RayJobUnavailable"
    assert "rayjobs.ray.io" in flag["message"]


def test_operator_result_carries_best_params_and_pseudo_label_stats() -> None:
    body = job({"stages": {"cotrain": COTRAIN, "tune": TUNE}})
    classifier_metrics = {
        "validAccuracy": 0.8,
        "pseudoLabels": 30,
        "pseudoLabels/a": 20,
        "pseudoLabels/b": 10,
        "pseudoLabelAccuracy": 0.9,
    }
    finals = {
        "finetune": final("finetune"),
        "cotrain-rules": final("cotrain-rules"),
        "cotrain-tail": final("cotrain-tail"),
        "tune": final("tune", {"trials": 8}, best_params={"learningRate": 0.003}),
        "classifier": final("classifier", classifier_metrics),
        "evaluate": final("evaluate", {"accuracy": 0.75}, model_uri="s3://m"),
    }
    decision = decide(body, finals=finals)
    status = decision.status or {}
    assert condition(status, "Succeeded") is not None
    assert status["result"]["bestParams"] == {"learningRate": 0.003}
    assert status["result"]["pseudoLabels"] == {
        "total": 30,
        "perClass": {"a": 20, "b": 10},
        "accuracy": 0.9,
    }
    assert status["tune"]["bestParams"] == {"learningRate": 0.003}
    # The status is a cache: recomputed from it alone (no store reads), the result is the same.
    store = Store()
    again = store.decide(after(body, decision))
    assert store.asked == []
    assert again.status is None


def test_operator_final_checkpoint_reads_best_params_from_meta() -> None:
    found = final_checkpoint(
        "s3://b/tune/final",
        format_time(NOW),
        {"metrics": {"trials": 4}, "bestParams": {"learningRate": 0.01, "head": "concat"}},
    )
    assert found.best_params == {"learningRate": 0.01}
    assert final_checkpoint("s3://b/x", format_time(NOW), {}).best_params is None
