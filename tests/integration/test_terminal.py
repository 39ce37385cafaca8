"""`ulmfit get|describe|logs|dashboard|suspend|resume` and `kubectl ulmfit` against a real API
server (tests.harness.kube).

No operator runs: each test writes, through the status subresource, the status the operator
would write for a job in the middle of its classifier stage (stages, conditions, the live
progress the operator reports), and creates the events the operator and the kubelet would.
Nothing runs pods here, so `logs` is checked up to the pods it picks and the API server's
answer for a pod that never ran; tests/integration/test_terminal_node.py reads a real pod's log.
"""

# The shared fixtures are imported from the harness module, so their names come back as
# test parameters:
# ruff: noqa: F811

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner
from ulmfit_operator.children import LABEL_ATTEMPT, LABEL_JOB, LABEL_STAGE
from ulmfit_operator.cli import app
from ulmfit_operator.runtime.kube import Kube, job_ref

from tests.harness.kube import ControlPlane, least_privilege_kubeconfig
from tests.harness.ports import free_port
from tests.harness.tools import Tool
from tests.integration.test_operator_harness import (  # noqa: F401 - fixtures
    admin,
    create_job,
    get_job,
    jobs_namespace,
    operator_crds,
)

pytestmark = pytest.mark.timeout(300)

runner = CliRunner()
SPEC = {
    "storage": {"s3": {"endpoint": "http://s3.example:9000", "bucket": "runs"},
                "credentialsSecretRef": "s3-credentials"},
    "resources": {"cpu": "1", "memory": "1Gi"},
}  # fmt: skip


@pytest.fixture(autouse=True)
def _crd_installed(operator_crds: None) -> None:
    """The ULMFiTJob CRD, served (once a session)."""


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def operator_status(name: str) -> dict[str, Any]:
    """What the operator writes while the classifier's second attempt runs."""
    now = datetime.now(UTC)
    return {
        "observedGeneration": 1,
        "currentStage": "classifier",
        "progress": "classifier phase 2/4, 63%",
        "startTime": stamp(now - timedelta(minutes=30)),
        "conditions": [
            {"type": "Running", "status": "True", "reason": "StageRunning",
             "message": "classifier attempt 2 is running",
             "lastTransitionTime": stamp(now - timedelta(minutes=20)), "observedGeneration": 1},
            {"type": "Suspended", "status": "False", "reason": "NotSuspended",
             "message": "", "lastTransitionTime": stamp(now - timedelta(minutes=30))},
        ],
        "stages": [
            {"name": "finetune", "kind": "finetune", "state": "Succeeded", "attempts": 1,
             "child": f"{name}-finetune-1",
             "checkpoint": f"s3://runs/ns/{name}/uid/finetune/final",
             "metrics": {"perplexity": 31.25}},
            {"name": "classifier", "kind": "classifier", "state": "Running", "attempts": 2,
             "failures": 1, "child": f"{name}-classifier-2",
             "progress": {"step": 120, "totalSteps": 400, "loss": 0.6123,
                          "tokensPerSecond": 1523.7, "etaSeconds": 754,
                          "updatedAt": stamp(now)}},
            {"name": "evaluate", "kind": "evaluate", "state": "Pending"},
        ],
    }  # fmt: skip


def make_job(kube: Kube, namespace: str, name: str, status: dict[str, Any] | None = None) -> dict:
    create_job(kube, namespace, name, SPEC)
    if status is not None:
        kube.merge_patch(job_ref(namespace, name), {"status": status}, sub="status")
    return get_job(kube, namespace, name)


def ulmfit(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env)


def with_namespace(kubeconfig: Path, namespace: str, target: Path) -> Path:
    """A copy of `kubeconfig` whose context defaults to `namespace`."""
    config = yaml.safe_load(kubeconfig.read_text())
    config["contexts"][0]["context"]["namespace"] = namespace
    target.write_text(yaml.safe_dump(config))
    return target


# --------------------------------------------------------------------------- get


def test_get_lists_the_jobs_of_the_contexts_namespace(
    kube_cluster: ControlPlane, admin: Kube, jobs_namespace: str, tmp_path: Path
) -> None:
    ns = jobs_namespace
    make_job(admin, ns, "topics", operator_status("topics"))
    make_job(admin, ns, "fresh")
    kubeconfig = with_namespace(kube_cluster.kubeconfig, ns, tmp_path / "kubeconfig")
    result = ulmfit("get", "--kubeconfig", str(kubeconfig))
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == ["NAME", "STATE", "STAGE", "PROGRESS", "ETA", "AGE"]
    assert lines[1][:3] == ["fresh", "Pending", "-"]
    assert lines[2][:7] == ["topics", "Running", "classifier", "classifier", "phase", "2/4,", "63%"]
    # KUBECONFIG names the file when --kubeconfig does not; -n wins over the context.
    other = ulmfit("get", "-n", "default", env={"KUBECONFIG": str(kubeconfig)})
    assert other.exit_code == 0, other.output
    assert "No ULMFiTJobs in namespace default" in other.output


def test_get_one_job_shows_its_stages_and_prints_the_object(
    kube_cluster: ControlPlane, admin: Kube, jobs_namespace: str
) -> None:
    ns, kubeconfig = jobs_namespace, str(kube_cluster.kubeconfig)
    stored = make_job(admin, ns, "topics", operator_status("topics"))
    result = ulmfit("get", "topics", "-n", ns, "--kubeconfig", kubeconfig)
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == ["ULMFiTJob", f"{ns}/topics:", "Running,", "stage", "classifier"]
    assert lines[1][:3] == ["STAGE", "STATE", "ATTEMPTS"]
    assert lines[2] == ["finetune", "Succeeded", "1", "done", "-", "-", "-", "yes",
                        "perplexity=31.25"]  # fmt: skip
    assert lines[3][:4] == ["classifier", "Running", "2", "(1"]
    assert lines[4][:2] == ["evaluate", "Pending"]
    # The live progress shows once the CRD's schema keeps it (the server prunes unknown fields).
    if "progress" in stored["status"]["stages"][1]:
        assert lines[3][5:10] == ["120/400", "(30%)", "0.6123", "1524", "12m"]
    printed = json.loads(ulmfit("get", "topics", "-n", ns, "--kubeconfig", kubeconfig,
                                "-o", "json").stdout)  # fmt: skip
    assert printed["metadata"]["uid"] == stored["metadata"]["uid"]
    assert printed["status"]["currentStage"] == "classifier"
    as_yaml = yaml.safe_load(ulmfit("get", "topics", "-n", ns, "--kubeconfig", kubeconfig,
                                    "-o", "yaml").stdout)  # fmt: skip
    assert as_yaml["spec"]["storage"]["s3"]["bucket"] == "runs"


# --------------------------------------------------------------------------- describe


def core_event(ns: str, job: dict[str, Any], reason: str, message: str, when: datetime) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{job['metadata']['name']}.", "namespace": ns},
        "involvedObject": {"apiVersion": "ulmfit.io/v1alpha1", "kind": "ULMFiTJob",
                           "name": job["metadata"]["name"], "namespace": ns,
                           "uid": job["metadata"]["uid"]},
        "type": "Normal", "reason": reason, "message": message, "count": 1,
        "firstTimestamp": stamp(when), "lastTimestamp": stamp(when),
        "source": {"component": "ulmfit-operator"},
    }  # fmt: skip


def pod_event(ns: str, pod: str, reason: str, note: str, when: datetime) -> dict:
    """An events.k8s.io/v1 event, as the kubelet writes them."""
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"generateName": f"{pod}-", "namespace": ns},
        "eventTime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": "kubelet", "reportingInstance": "node-1",
        "action": "Pulling", "reason": reason, "note": note, "type": "Warning",
        "regarding": {"apiVersion": "v1", "kind": "Pod", "name": pod, "namespace": ns},
    }  # fmt: skip


def labelled_pod(ns: str, name: str, job: str, stage: str, attempt: int) -> dict[str, Any]:
    labels = {LABEL_JOB: job, LABEL_STAGE: stage, LABEL_ATTEMPT: str(attempt)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "trainer", "image": "trainer:test"}]},
    }


def test_describe_shows_spec_stages_conditions_and_the_events_of_job_and_children(
    kube_cluster: ControlPlane, admin: Kube, jobs_namespace: str
) -> None:
    ns = jobs_namespace
    job = make_job(admin, ns, "topics", operator_status("topics"))
    pod = "topics-classifier-2-master-0"
    pods = f"/api/v1/namespaces/{ns}/pods"
    admin.request("POST", pods, labelled_pod(ns, pod, "topics", "classifier", 2))
    now = datetime.now(UTC)
    events = f"/api/v1/namespaces/{ns}/events"
    admin.request("POST", events, core_event(ns, job, "StageStarted", "classifier attempt 2",
                                             now - timedelta(minutes=3)))  # fmt: skip
    admin.request("POST", f"/apis/events.k8s.io/v1/namespaces/{ns}/events",
                  pod_event(ns, pod, "BackOff", "back-off pulling image", now))  # fmt: skip
    stranger = core_event(ns, job, "Elsewhere", "not about this job", now)
    stranger["involvedObject"] = {"kind": "ULMFiTJob", "name": "other", "namespace": ns}
    admin.request("POST", events, stranger)

    result = ulmfit("describe", "topics", "-n", ns, "--kubeconfig", str(kube_cluster.kubeconfig))
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Name:        topics" in text and f"Namespace:   {ns}" in text
    assert "State:       Running" in text
    assert "  storage: " in text and "s3.example" in text, text
    stages = text.split("Stages:")[1].split("Conditions:")[0]
    assert "finetune" in stages and "classifier" in stages and "evaluate" in stages
    conditions = [line.split() for line in text.split("Conditions:")[1].split("Events:")[0]
                  .strip().splitlines()]  # fmt: skip
    assert conditions[0] == ["TYPE", "STATUS", "REASON", "MESSAGE", "AGE"]
    assert conditions[1][:3] == ["Running", "True", "StageRunning"]
    assert "classifier attempt 2 is running" in " ".join(conditions[1])
    assert conditions[1][-1] == "20m"
    assert conditions[2][:3] == ["Suspended", "False", "NotSuspended"]
    event_lines = text.split("Events:")[1].strip().splitlines()[1:]
    assert len(event_lines) == 2, text  # not the other job's
    assert "StageStarted" in event_lines[0] and "ULMFiTJob/topics" in event_lines[0]
    assert "BackOff" in event_lines[1] and f"Pod/{pod}" in event_lines[1]  # newest last


# --------------------------------------------------------------------------- suspend, resume


def test_suspend_and_resume_patch_the_job_on_the_server(
    kube_cluster: ControlPlane, admin: Kube, jobs_namespace: str
) -> None:
    ns, kubeconfig = jobs_namespace, str(kube_cluster.kubeconfig)
    before = make_job(admin, ns, "topics", operator_status("topics"))
    result = ulmfit("suspend", "topics", "-n", ns, "--kubeconfig", kubeconfig)
    assert result.exit_code == 0, result.output
    assert f"ULMFiTJob {ns}/topics suspended: spec.runPolicy.suspend=true" in result.stdout
    stored = get_job(admin, ns, "topics")
    assert stored["spec"]["runPolicy"]["suspend"] is True
    assert stored["spec"]["storage"] == before["spec"]["storage"]  # a merge patch: the rest stays

    again = ulmfit("suspend", "topics", "-n", ns, "--kubeconfig", kubeconfig)
    assert again.exit_code == 0 and "already suspended" in again.stdout

    result = ulmfit("resume", "topics", "-n", ns, "--kubeconfig", kubeconfig)
    assert result.exit_code == 0, result.output
    assert "resumed: spec.runPolicy.suspend=false" in result.stdout
    assert get_job(admin, ns, "topics")["spec"]["runPolicy"]["suspend"] is False


# --------------------------------------------------------------------------- errors


def test_a_missing_job_is_named_with_its_namespace(
    kube_cluster: ControlPlane, operator_crds: None, kube_namespace: str
) -> None:
    for command in ("get", "describe", "logs", "dashboard", "suspend", "resume"):
        result = ulmfit(command, "nope", "-n", kube_namespace,
                        "--kubeconfig", str(kube_cluster.kubeconfig))  # fmt: skip
        assert result.exit_code == 1, (command, result.output)
        assert f"ULMFiTJob 'nope' not found in namespace {kube_namespace}" in result.stderr


def test_a_user_who_may_not_patch_is_told_which_verb_was_denied(
    kube_cluster: ControlPlane, admin: Kube, jobs_namespace: str, tmp_path: Path
) -> None:
    ns = jobs_namespace
    make_job(admin, ns, "topics", operator_status("topics"))
    viewer = least_privilege_kubeconfig(
        kube_cluster,
        [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "ulmfit-viewer"},
             "rules": [{"apiGroups": ["ulmfit.io"], "resources": ["ulmfitjobs"],
                        "verbs": ["get", "list"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "ulmfit-viewer"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                         "name": "ulmfit-viewer"},
             "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": ns}]},
        ],
        ns,
        "viewer",
        path=tmp_path / "viewer.kubeconfig",
    )  # fmt: skip
    # Reading works (the kubeconfig's context names the namespace)...
    listed = ulmfit("get", "--kubeconfig", str(viewer))
    assert listed.exit_code == 0 and "topics" in listed.stdout, listed.output
    # ...describe still shows the job without the rights to list events...
    described = ulmfit("describe", "topics", "--kubeconfig", str(viewer))
    assert described.exit_code == 0, described.output
    assert "events not shown: forbidden" in described.stdout
    # ...and a patch names what was denied.
    result = ulmfit("suspend", "topics", "--kubeconfig", str(viewer))
    assert result.exit_code == 1
    denied = f'may not patch ulmfitjobs "topics" in namespace {ns}'
    assert f"forbidden: your kubeconfig's user {denied}" in result.stderr
    assert "system:serviceaccount" in result.stderr  # the server's own words follow
    assert get_job(admin, ns, "topics")["spec"].get("runPolicy", {}).get("suspend") in (None, False)


def test_no_kubeconfig_is_a_clear_message(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "KUBECONFIG": "", "KUBERNETES_SERVICE_HOST": ""}
    result = ulmfit("get", env=env)
    assert result.exit_code == 1
    assert "no kubeconfig found" in result.stderr and "--kubeconfig" in result.stderr
    missing = ulmfit("get", "--kubeconfig", str(tmp_path / "absent"))
    assert missing.exit_code == 1 and f"no kubeconfig at {tmp_path / 'absent'}" in missing.stderr


# --------------------------------------------------------------------------- logs, dashboard


def test_logs_pick_the_current_attempts_pods_and_report_one_that_never_ran(
    kube_cluster: ControlPlane, admin: Kube, jobs_namespace: str
) -> None:
    ns, kubeconfig = jobs_namespace, str(kube_cluster.kubeconfig)
    make_job(admin, ns, "topics", operator_status("topics"))
    nothing = ulmfit("logs", "topics", "-n", ns, "--kubeconfig", kubeconfig)
    assert nothing.exit_code == 1
    assert f"no pods of ULMFiTJob {ns}/topics (stage classifier attempt 2)" in nothing.stderr
    # An old attempt's pod is not the current one; the current one never ran (no node here).
    pods = f"/api/v1/namespaces/{ns}/pods"
    admin.request("POST", pods, labelled_pod(ns, "topics-classifier-1-master-0", "topics",
                                             "classifier", 1))  # fmt: skip
    admin.request("POST", pods, labelled_pod(ns, "topics-classifier-2-master-0", "topics",
                                             "classifier", 2))  # fmt: skip
    result = ulmfit("logs", "topics", "-n", ns, "--kubeconfig", kubeconfig)
    assert result.exit_code == 1
    assert "pod topics-classifier-2-master-0 has no log yet: Pending" in result.stderr
    assert "topics-classifier-1-master-0" not in result.stderr
    unknown = ulmfit("logs", "topics", "--stage", "tune", "-n", ns, "--kubeconfig", kubeconfig)
    assert unknown.exit_code == 1 and "has no stage 'tune'" in unknown.stderr


def test_dashboard_runs_kubectl_port_forward_and_fails_cleanly_without_the_service(
    kube_cluster: ControlPlane, admin: Kube, jobs_namespace: str, kubectl: Tool,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:  # fmt: skip
    ns, kubeconfig = jobs_namespace, str(kube_cluster.kubeconfig)
    make_job(admin, ns, "bare", operator_status("bare"))
    status = operator_status("topics")
    status["tune"] = {
        "backend": "pod", "service": "topics-ray", "dashboard": "http://localhost:8265",
        "portForward": f"kubectl port-forward -n {ns} svc/topics-ray 8265:8265",
    }  # fmt: skip
    make_job(admin, ns, "topics", status)
    monkeypatch.setenv("PATH", f"{kubectl.path.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KUBECACHEDIR", kubectl.env["KUBECACHEDIR"])

    no_tune = ulmfit("dashboard", "bare", "-n", ns, "--kubeconfig", kubeconfig)
    assert no_tune.exit_code == 1 and "has no Ray dashboard" in no_tune.stderr

    port = free_port()
    result = ulmfit("dashboard", "topics", "-n", ns, "--kubeconfig", kubeconfig,
                    "--port", str(port))  # fmt: skip
    assert result.exit_code == 1, result.output
    assert f"http://localhost:{port}" in result.stdout
    assert f"port-forward --address 127.0.0.1 svc/topics-ray {port}:8265" in result.stdout
    assert 'services "topics-ray" not found' in result.stderr  # kubectl itself answered
    assert f"kubectl port-forward to svc/topics-ray in namespace {ns} exited" in result.stderr

    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl anywhere
    missing = ulmfit("dashboard", "topics", "-n", ns, "--kubeconfig", kubeconfig)
    assert missing.exit_code == 1 and "kubectl not found on PATH" in missing.stderr


# --------------------------------------------------------------------------- kubectl plugin


def test_kubectl_runs_the_plugin(
    kube_cluster: ControlPlane, admin: Kube, jobs_namespace: str, kubectl: Tool
) -> None:
    """`kubectl ulmfit ...` finds `kubectl-ulmfit` (the project's script) on PATH."""
    ns = jobs_namespace
    make_job(admin, ns, "topics", operator_status("topics"))
    scripts = Path(sys.executable).parent
    assert (scripts / "kubectl-ulmfit").is_file(), "reinstall the project: `make env`"
    path = os.pathsep.join([str(scripts), str(kubectl.path.parent), os.environ["PATH"]])
    tool = Tool(kubectl.path, {**kubectl.env, "PATH": path})
    plugins = tool.run("plugin", "list", check=False)
    assert "kubectl-ulmfit" in plugins.stdout, plugins.stdout + plugins.stderr
    got = tool.run("ulmfit", "get", "topics", "-n", ns, kubeconfig=kube_cluster.kubeconfig)
    assert "classifier" in got.stdout and "Running" in got.stdout
    described = tool.run("ulmfit", "describe", "topics", "-n", ns,
                         kubeconfig=kube_cluster.kubeconfig)  # fmt: skip
    assert "Conditions:" in described.stdout and "StageRunning" in described.stdout
    missing = tool.run("ulmfit", "get", "nope", "-n", ns, kubeconfig=kube_cluster.kubeconfig,
                       check=False)  # fmt: skip
    assert missing.returncode == 1
    assert f"ULMFiTJob 'nope' not found in namespace {ns}" in missing.stderr
