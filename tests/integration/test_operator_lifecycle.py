"""The operator on real parts: a real API server, a real S3 store, the operator as a process.

The Kubeflow Training Operator and the trainer are played by the harness's `Trainer` (see
tests/integration/test_operator_harness.py); tests/e2e/test_cluster_jobs.py runs the same
paths under the real controllers.
"""

# The shared fixtures are imported from the harness module, so their names come back as
# test parameters:
# ruff: noqa: F811

from __future__ import annotations

import json
import time

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from ulmfit_operator.api import parse_spec
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.runtime.kube import Kube, job_ref
from ulmfit_trainer.config import StageConfig
from ulmfit_trainer.errors import InvalidSpec

from tests.harness.ports import wait_for
from tests.harness.s3 import SeaweedS3
from tests.harness.tools import Tool
from tests.integration.test_operator_harness import (  # noqa: F401 - fixtures
    OperatorProcess,
    Trainer,
    admin,
    collect_garbage,
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
    patch_job_spec,
    run_path,
    shared_operator,
    start_operator,
    trainer,
    wait_child,
    wait_job,
    wait_job_gone,
)

pytestmark = pytest.mark.timeout(300)


def test_operator_walks_a_job_through_every_stage(
    start_operator,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    kube_namespace: str,
    kubectl: Tool,
    kube_cluster,
) -> None:
    operator: OperatorProcess = start_operator()
    ns, name = kube_namespace, "topics"
    spec = job_spec(
        s3_server,
        s3_bucket,
        stages={"pretrain": {"epochs": 1}},
        resources={
            "cpu": "1",
            "memory": "1Gi",
            "workers": 2,
            "processesPerWorker": 2,
            "gpusPerWorker": 2,
        },
    )
    run = run_path(create_job(admin, ns, name, spec))
    assert run.startswith(f"{ns}/{name}/")  # the job's uid is part of its store path
    uris = {}
    for stage in ("pretrain", "finetune", "classifier", "evaluate"):
        child = wait_child(admin, ns, f"{name}-{stage}-a1")
        meta = child["metadata"]
        [owner] = meta["ownerReferences"]
        assert owner["kind"] == "ULMFiTJob" and owner["name"] == name and owner["controller"]
        if stage == "evaluate":
            assert child["kind"] == "Job"
            pod = child["spec"]["template"]["spec"]
            assert pod["containers"][0]["command"][:4] == [
                "python",
                "-m",
                "ulmfit_trainer",
                "evaluate",
            ]
        else:
            assert child["kind"] == "PyTorchJob"
            replicas = child["spec"]["pytorchReplicaSpecs"]
            assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
            pod = replicas["Worker"]["template"]["spec"]
            command = pod["containers"][0]["command"]
            assert command[:3] == ["torchrun", "--nnodes=2", "--nproc-per-node=2"]
            assert command[-5:] == [
                "-m",
                "ulmfit_trainer",
                stage,
                "--config",
                "/etc/ulmfit/stage.json",
            ]
            assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
        container = pod["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
            "name": "s3-credentials",
            "key": "AWS_ACCESS_KEY_ID",
        }
        assert container["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        previous = {"finetune": "pretrain", "classifier": "finetune", "evaluate": "classifier"}
        if stage in previous:
            assert meta["annotations"]["ulmfit.io/init-checkpoint"] == uris[previous[stage]]
        # The stage config, in an owned ConfigMap.
        config_map = admin.request(
            "GET", f"/api/v1/namespaces/{ns}/configmaps/{meta['name']}-config"
        )
        config = StageConfig.model_validate(json.loads(config_map["data"]["stage.json"]))
        assert config.stage == stage and config.run == run
        assert config.s3 is not None and config.s3.bucket == s3_bucket
        assert config_map["metadata"]["ownerReferences"][0]["name"] == name
        # Progress shows up in the status while the stage runs.
        trainer.set_status(child, "Running")
        trainer.progress(ns, name, stage, 63, 100, phase=2, phases=4, run=run)
        live = wait_job(
            admin,
            ns,
            name,
            lambda j, s=stage: (j.get("status") or {}).get("progress") == f"{s} phase 2/4, 63%",
            f"progress of {stage}",
        )
        # ... with the trainer's numbers in the stage's entry, and per-job gauges on /metrics.
        [entry] = [e for e in live["status"]["stages"] if e["name"] == stage]
        assert entry["progress"]["step"] == 63 and entry["progress"]["totalSteps"] == 100
        assert entry["progress"]["loss"] == 2.5
        assert entry["progress"]["tokensPerSecond"] == 1000.0
        # (set just after the status patch lands, so it may trail the status by a moment)
        wait_for(
            lambda s=stage: operator.metric(
                "ulmfit_stage_progress_ratio", namespace=ns, job=name, stage=s
            )
            == pytest.approx(0.63),
            10,
            f"the progress gauge of {stage}",
        )
        metrics = evaluation_metrics(0.875, 0.31) if stage == "evaluate" else {"loss": 1.5}
        extra = {"modelUri": f"s3://{s3_bucket}/runs/{run}/model"} if stage == "evaluate" else {}
        uris[stage] = trainer.commit_final(ns, name, stage, metrics, run=run, **extra)
        assert uris[stage].startswith(f"s3://{s3_bucket}/runs/{run}/{stage}/")
        trainer.set_status(child, "Succeeded")
    job = wait_job(admin, ns, name, lambda j: is_true(j, "Succeeded"), "Succeeded")
    status = job["status"]
    assert status["result"] == {
        "modelUri": f"s3://{s3_bucket}/runs/{run}/model",
        "testMetrics": evaluation_metrics(0.875, 0.31),
    }
    succeeded = condition(job, "Succeeded")
    assert succeeded is not None
    assert "test accuracy 0.8750 (majority baseline 0.3100)" in succeeded["message"]
    assert [(s["name"], s["state"], s["checkpoint"]) for s in status["stages"]] == [
        (stage, "Succeeded", uris[stage]) for stage in uris
    ]
    running = condition(job, "Running")
    assert running is not None and running["status"] == "False"
    assert status["observedGeneration"] == job["metadata"]["generation"]
    # Exactly one child per stage.
    children = list_children(admin, ns, name)
    assert sorted(c["metadata"]["name"] for c in children) == sorted(
        f"{name}-{stage}-a1" for stage in uris
    )
    reasons = wait_for(
        lambda: (
            [e["reason"] for e in events(admin, ns, name)]
            if len(events(admin, ns, name)) >= 9
            else None
        ),
        10,
        "the events",
    )
    assert reasons.count("StageStarted") == 4 and reasons.count("StageSucceeded") == 4
    assert reasons.count("Succeeded") == 1
    # kubectl shows the printer columns.
    table = kubectl.run("get", "ulmfitjobs", "-n", ns, kubeconfig=kube_cluster.kubeconfig).stdout
    header, row = table.strip().splitlines()
    assert header.split() == ["NAME", "STAGE", "PROGRESS", "ETA", "ACCURACY", "AGE"]
    assert row.split()[:4] == [name, "evaluate", "Succeeded", "0.875"]  # no ETA once done
    # API writes for the job (the leader Lease aside): at most 10 per stage transition.
    writes = operator.metric("ulmfit_api_writes_total") - operator.metric(
        "ulmfit_api_writes_total", resource="leases"
    )
    assert 4 * 4 <= writes <= 10 * 4, operator.metrics_text()


# --------------------------------------------------------------------------------- admission


def _job_yaml(name: str, spec: dict) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "ulmfit.io/v1alpha1",
            "kind": "ULMFiTJob",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


@pytest.mark.parametrize(
    ("spec", "where", "cel"),
    [
        (
            {"model": {"architecture": {"hiddenSize": 100, "heads": 3}}},
            "spec.model.architecture",
            True,
        ),
        ({"data": {"maxLength": 512}}, "spec", True),
        ({"resources": {"gpusPerWorker": 2, "processesPerWorker": 4}}, "spec.resources", True),
        (
            {"stages": {"classifier": {"learningRate": -1}}},
            "spec.stages.classifier.learningRate",
            False,
        ),
        ({"resources": {"imagePullPolicy": "Sometimes"}}, "spec.resources.imagePullPolicy", False),
        ({"data": {"dataset": ""}}, "spec.data.dataset", True),
        ({"data": {"dataset": "s3:///train"}}, "spec.data.dataset", True),
        ({"model": {"pretrained": "s3://"}}, "spec.model.pretrained", True),
        ({"tokenizer": {"pretrained": "s3://models"}}, "spec.tokenizer.pretrained", True),
        (
            {"model": {"family": "masked"}, "stages": {"classifier": {"head": "generative"}}},
            "spec",
            True,
        ),
        (
            {
                "model": {"family": "masked"},
                "stages": {
                    "cotrain": {
                        "models": [{"name": "a"}],
                        "minAgreement": 1,
                        "classifier": {"head": "generative"},
                    }
                },
            },
            "spec",
            True,
        ),
        ({"deepspeed": {"precision": "fp16"}}, "spec", True),
    ],
    ids=[
        "heads", "max-length", "gpus", "minimum", "enum", "empty-dataset", "s3-no-bucket",
        "s3-model", "s3-whole-bucket", "generative-masked", "generative-masked-cotrain",
        "fp16-on-cpu",
    ],
)  # fmt: skip
def test_operator_crd_rejects_invalid_jobs_at_admission(
    spec: dict,
    where: str,
    cel: bool,
    operator_crds,
    kube_cluster,
    kube_namespace: str,
    kubectl: Tool,
) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec)
    field, _, message = caught.value.problems[0]
    assert field.startswith(where)
    result = kubectl.run(
        "apply",
        "-n",
        kube_namespace,
        "-f",
        "-",
        input=_job_yaml("bad", spec),
        kubeconfig=kube_cluster.kubeconfig,
        check=False,
    )
    assert result.returncode != 0
    assert f"{where}: " in result.stderr, result.stderr
    if cel:  # a CEL rule says exactly what the pydantic validator says
        assert f'{where}: Invalid value: "object": {message}' in result.stderr, result.stderr
    assert get_or_none(kube_cluster, kube_namespace) is None


@pytest.mark.parametrize(
    "spec",
    [
        {"data": {"dataset": "s3://ulmfit-data/tickets/"}},
        {"model": {"pretrained": None}, "tokenizer": {"pretrained": None}},
        {"model": {"pretrained": "s3://models/gpt2"}, "tokenizer": {"pretrained": "/models/gpt2"}},
        {"stages": {"classifier": {"head": "generative"}}},
        {
            "model": {"family": "masked"},
            "stages": {
                "classifier": {"head": "attention"},
                "cotrain": {"models": [{"name": "a"}], "minAgreement": 1, "classifier": None},
            },
        },
        {"deepspeed": {"precision": "bf16"}},
        {"deepspeed": {"precision": "fp16"}, "resources": {"gpusPerWorker": 1}},
    ],
    ids=[
        "s3-dataset", "null-pretrained", "s3-model", "generative-causal", "masked-null-cotrain",
        "bf16-on-cpu", "fp16-on-gpu",
    ],
)  # fmt: skip
def test_operator_crd_admits_the_specs_next_to_the_refused_ones(
    spec: dict, operator_crds, kube_cluster, kube_namespace: str, kubectl: Tool
) -> None:
    parse_spec(spec)
    result = kubectl.run(
        "apply", "--dry-run=server", "-n", kube_namespace, "-f", "-",
        input=_job_yaml("near", spec), kubeconfig=kube_cluster.kubeconfig, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def get_or_none(kube_cluster, namespace: str):
    with kube_cluster.api_client() as api:
        try:
            return get_job(Kube(api, OperatorMetrics()), namespace, "bad")
        except ApiException as error:
            assert error.status == 404
            return None


def test_operator_crd_defaults_match_the_models(
    operator_crds, admin: Kube, jobs_namespace: str
) -> None:
    given = {"stages": {"pretrain": {"epochs": 2}}, "resources": {"workers": 2}}
    created = create_job(admin, jobs_namespace, "defaults", given)
    assert created["spec"] == parse_spec(given).to_wire()
    assert parse_spec(created["spec"]).to_wire() == created["spec"]


def test_operator_spec_is_immutable_but_run_policy_is_not(
    operator_crds, admin: Kube, jobs_namespace: str
) -> None:
    create_job(admin, jobs_namespace, "fixed", {"seed": 1})
    with pytest.raises(ApiException) as caught:
        patch_job_spec(admin, jobs_namespace, "fixed", {"seed": 2})
    assert "spec.seed is immutable" in caught.value.body
    patch_job_spec(admin, jobs_namespace, "fixed", {"runPolicy": {"suspend": True}})


# ------------------------------------------------------------------------- operator decisions


def test_operator_marks_a_job_it_cannot_run_invalid(
    shared_operator: OperatorProcess, admin: Kube, jobs_namespace: str, s3_server: SeaweedS3
) -> None:
    ns = jobs_namespace
    create_job(admin, ns, "no-store", {"runPolicy": {"ttlSecondsAfterFinished": 300}})
    create_job(
        admin,
        ns,
        "bad-endpoint",
        {"storage": {"s3": {"endpoint": "ftp://store", "bucket": "ulmfit"}}},
    )
    # This API server serves PyTorchJobs only: no Kubeflow Trainer v2.
    wants = job_spec(s3_server, "ulmfit", resources={"trainingBackend": "trainjob"})
    create_job(admin, ns, "wants-trainjob", wants)
    for name, field in (
        ("no-store", "spec.storage.s3"),
        ("bad-endpoint", "spec.storage.s3.endpoint"),
        ("wants-trainjob", "spec.resources.trainingBackend"),
    ):
        job = wait_job(admin, ns, name, lambda j: is_true(j, "Failed"), "Failed")
        failed = condition(job, "Failed")
        assert failed is not None and failed["reason"] == "InvalidSpec"
        assert field in failed["message"]
        if name == "wants-trainjob":
            assert "trainjobs.trainer.kubeflow.org" in failed["message"], failed
        warnings = wait_for(
            lambda n=name: [e for e in events(admin, ns, n) if e["type"] == "Warning"],
            10,
            "the Warning event",
        )
        assert [e["reason"] for e in warnings] == ["InvalidSpec"]
        assert field in warnings[0]["message"] and len(warnings[0]["message"]) < 1024
    time.sleep(3)  # a few resyncs later: still no child, still one event each
    assert list_children(admin, ns) == []
    assert len(events(admin, ns, "no-store")) == 1


def test_operator_retries_a_failed_stage_then_gives_up(
    shared_operator: OperatorProcess,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    ns, name = jobs_namespace, "flaky"
    create_job(admin, ns, name, job_spec(s3_server, s3_bucket, runPolicy={"backoffLimit": 1}))
    first = wait_child(admin, ns, f"{name}-finetune-a1")
    trainer.set_status(first, "Running")
    trainer.set_status(first, "Failed", "pod OOMKilled")
    second = wait_child(admin, ns, f"{name}-finetune-a2")
    job = get_job(admin, ns, name)
    stage = next(s for s in job["status"]["stages"] if s["name"] == "finetune")
    assert stage["attempts"] == 2 and stage["failures"] == 1
    # The second attempt "succeeds" but commits no final checkpoint: a failure too.
    trainer.set_status(second, "Succeeded")
    job = wait_job(admin, ns, name, lambda j: is_true(j, "Failed"), "Failed")
    failed = condition(job, "Failed")
    assert failed is not None and failed["reason"] == "BackoffLimitExceeded"
    assert "finetune failed 2 times" in failed["message"]
    assert [c["metadata"]["name"] for c in list_children(admin, ns, name)] == [
        f"{name}-finetune-a1",
        f"{name}-finetune-a2",
    ]
    warnings = wait_for(
        lambda: [e["reason"] for e in events(admin, ns, name) if e["type"] == "Warning"],
        10,
        "the Warning event",
    )
    assert warnings == ["BackoffLimitExceeded"]


def test_operator_resumes_a_stage_from_its_checkpoint_after_a_failure(
    shared_operator: OperatorProcess,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    ns, name = jobs_namespace, "resumes"
    create_job(admin, ns, name, job_spec(s3_server, s3_bucket))
    first = wait_child(admin, ns, f"{name}-finetune-a1")
    trainer.set_status(first, "Failed", "node lost")
    second = wait_child(admin, ns, f"{name}-finetune-a2")
    trainer.complete(second)
    wait_child(admin, ns, f"{name}-classifier-a1")
    job = get_job(admin, ns, name)
    stage = next(s for s in job["status"]["stages"] if s["name"] == "finetune")
    assert stage["state"] == "Succeeded" and stage["failures"] == 1


def test_operator_runs_a_recreated_job_afresh_in_its_own_store_path(
    shared_operator: OperatorProcess,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
    tmp_path,
) -> None:
    """A job deleted and created again under the same name is a new job: its store path carries
    its uid, so what the old one left (a final checkpoint, a half-done stage) is neither counted
    nor resumed, and its trainers train from scratch. (Before, the path was by name: every
    attempt of the new job's first stage found the old final, exited "already finished" without
    a fresh one, and the job ended BackoffLimitExceeded.)"""
    ns, name = jobs_namespace, "again"
    spec = job_spec(s3_server, s3_bucket, runPolicy={"backoffLimit": 1})
    old = create_job(admin, ns, name, spec)
    old_uid, old_run = old["metadata"]["uid"], run_path(old)
    old_final = trainer.complete(wait_child(admin, ns, f"{name}-finetune-a1"))
    # The classifier gets partway: a committed phase checkpoint and its progress.
    classifier = wait_child(admin, ns, f"{name}-classifier-a1")
    trainer.set_status(classifier, "Running")
    phase_dir = tmp_path / "phase-1"
    phase_dir.mkdir()
    (phase_dir / "weights.bin").write_bytes(b"the old job's phase 1")
    old_store = trainer.checkpoints(ns, name, old_run)
    old_store.save("classifier", "phase-1", phase_dir, meta={"phase": 1}, step=40)
    trainer.progress(ns, name, "classifier", 40, 100, phase=1, phases=3, run=old_run)
    wait_job(
        admin,
        ns,
        name,
        lambda j: j.get("status", {}).get("progress") == "classifier phase 1/3, 40%",
        "the old job's classifier progress",
    )

    admin.delete(job_ref(ns, name))
    wait_job_gone(admin, ns, name, "the old job to be deleted")
    collect_garbage(admin, ns, name, old_uid)
    new = create_job(admin, ns, name, spec)
    new_uid, new_run = new["metadata"]["uid"], run_path(new)

    # The first stage starts again, as attempt 1 of the new job, in the new job's path; the old
    # final does not count.
    first = wait_child(admin, ns, f"{name}-finetune-a1", owner_uid=new_uid)
    assert trainer.config(first).run == new_run
    job = wait_job(admin, ns, name, lambda j: j.get("status", {}).get("stages"), "its stages")
    finetune = next(s for s in job["status"]["stages"] if s["name"] == "finetune")
    assert finetune["state"] != "Succeeded" and finetune.get("checkpoint") is None, finetune
    # Progress is read from the new job's path.
    trainer.set_status(first, "Running")
    trainer.progress(ns, name, "finetune", 30, 100, run=new_run)
    wait_job(
        admin,
        ns,
        name,
        lambda j: j.get("status", {}).get("progress") == "finetune 30%",
        "the new job's finetune progress",
    )
    # Its trainer finds no final in its own path, so it trains and commits a new one.
    new_final = trainer.complete(first)
    assert new_final != old_final
    # The half-done classifier is not resumed: its checkpoint is the old job's, not this one's.
    classifier = wait_child(admin, ns, f"{name}-classifier-a1", owner_uid=new_uid)
    assert classifier["metadata"]["annotations"]["ulmfit.io/init-checkpoint"] == new_final
    assert trainer.config(classifier).run == new_run
    assert trainer.checkpoints(ns, name, new_run).latest("classifier") is None
    trainer.complete(classifier)
    evaluate = wait_child(admin, ns, f"{name}-evaluate-a1", owner_uid=new_uid)
    trainer.complete(evaluate, evaluation_metrics(0.75, 0.25))
    job = wait_job(admin, ns, name, lambda j: is_true(j, "Succeeded"), "Succeeded")
    stages = {s["name"]: s for s in job["status"]["stages"]}
    assert [(s["state"], s["attempts"]) for s in stages.values()] == [("Skipped", 0)] + [
        ("Succeeded", 1)
    ] * 3
    assert stages["finetune"]["checkpoint"] == new_final
    assert new_run == f"{ns}/{name}/{new_uid}" != old_run
    assert all(f"/runs/{new_run}/" in stages[s]["checkpoint"] for s in stages if s != "pretrain")
    # What the old job made stays in the store, where it was.
    assert old_store.final("finetune") is not None and old_store.final("finetune").uri == old_final
    assert old_store.latest("classifier") is not None


def test_operator_suspends_and_resumes_a_job(
    shared_operator: OperatorProcess,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    ns, name = jobs_namespace, "pausing"
    create_job(admin, ns, name, job_spec(s3_server, s3_bucket))
    trainer.complete(wait_child(admin, ns, f"{name}-finetune-a1"))
    running = wait_child(admin, ns, f"{name}-classifier-a1")
    trainer.set_status(running, "Running")
    patch_job_spec(admin, ns, name, {"runPolicy": {"suspend": True}})
    job = wait_job(admin, ns, name, lambda j: is_true(j, "Suspended"), "Suspended")
    assert (job["status"]["progress"], job["status"]["currentStage"]) == ("Suspended", "classifier")
    wait_for(
        lambda: (
            [c["metadata"]["name"] for c in list_children(admin, ns, name)]
            == [f"{name}-finetune-a1"]
        ),
        30,
        "the running child to be deleted",
    )
    # The finished stage's checkpoint is kept.
    assert trainer.checkpoints(ns, name).latest("finetune") is not None
    patch_job_spec(admin, ns, name, {"runPolicy": {"suspend": False}})
    job = wait_job(
        admin,
        ns,
        name,
        lambda j: (
            condition(j, "Suspended") is not None and condition(j, "Suspended")["status"] == "False"
        ),
        "resumed",
    )
    assert condition(job, "Suspended")["reason"] == "Resumed"
    resumed = wait_child(admin, ns, f"{name}-classifier-a1")
    trainer.complete(resumed)
    trainer.complete(wait_child(admin, ns, f"{name}-evaluate-a1"), {"accuracy": 0.5})
    wait_job(admin, ns, name, lambda j: is_true(j, "Succeeded"), "Succeeded")
    reasons = [e["reason"] for e in events(admin, ns, name)]
    assert reasons.count("Suspended") == 1 and reasons.count("Resumed") == 1


def test_operator_enforces_the_active_deadline(
    shared_operator: OperatorProcess,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    ns, name = jobs_namespace, "late"
    create_job(
        admin, ns, name, job_spec(s3_server, s3_bucket, runPolicy={"activeDeadlineSeconds": 4})
    )
    trainer.set_status(wait_child(admin, ns, f"{name}-finetune-a1"), "Running")
    job = wait_job(admin, ns, name, lambda j: is_true(j, "Failed"), "Failed", timeout=30)
    assert condition(job, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: list_children(admin, ns, name) == [], 30, "the child to be deleted")


def test_operator_deletes_a_finished_job_after_its_ttl(
    shared_operator: OperatorProcess,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    ns, name = jobs_namespace, "short-lived"
    created = create_job(
        admin,
        ns,
        name,
        job_spec(s3_server, s3_bucket, runPolicy={"backoffLimit": 0, "ttlSecondsAfterFinished": 2}),
    )
    trainer.set_status(wait_child(admin, ns, f"{name}-finetune-a1"), "Failed")
    wait_job(admin, ns, name, lambda j: is_true(j, "Failed"), "Failed")
    wait_job_gone(admin, ns, name, "the job to be deleted after its TTL")
    # The store keeps what the job made.
    assert trainer.checkpoints(ns, name, run_path(created)).read_progress("finetune") is None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_operator_stops_a_stalled_attempt(
    shared_operator: OperatorProcess,
    admin: Kube,
    trainer: Trainer,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
) -> None:
    ns, name = jobs_namespace, "stalled"
    create_job(
        admin, ns, name, job_spec(s3_server, s3_bucket, runPolicy={"progressDeadlineSeconds": 30})
    )
    first = wait_child(admin, ns, f"{name}-finetune-a1")
    trainer.set_status(first, "Running")
    trainer.progress(ns, name, "finetune", 10, 100)
    wait_child(admin, ns, f"{name}-finetune-a2", timeout=120)
    stopped = admin.get(Trainer.ref(first))
    assert stopped["metadata"]["annotations"]["ulmfit.io/stopped"] == "ProgressDeadlineExceeded"
    assert stopped["spec"]["runPolicy"]["suspend"] is True
    job = get_job(admin, ns, name)
    stage = next(s for s in job["status"]["stages"] if s["name"] == "finetune")
    assert stage["failures"] == 1 and stage["attempts"] == 2
    assert "ProgressDeadlineExceeded" in [e["reason"] for e in events(admin, ns, name)]
