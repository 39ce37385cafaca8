"""What a job may make the operator reach, on real parts (issue #14).

- The chart's ValidatingAdmissionPolicy, rendered by the real helm and applied to the real
  kube-apiserver, admits a ULMFiTJob only with a trainer image that `allowedTrainerImages` allows
  (on create, and on an update that changes the image), where its binding applies; the operator's
  own matching agrees with the API server's on every image tried.
- The operator (a real process, real API server, real SeaweedFS) fails a job naming an S3
  endpoint outside `--allowed-s3-endpoints`, or a trainer image outside
  `--allowed-trainer-images`, as InvalidSpec, creates no child for it, and never connects to
  that endpoint (a listening socket of the test's own sees no connection).
"""

# The shared fixtures are imported from the harness module, so their names come back as
# test parameters:
# ruff: noqa: F811

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from ulmfit_operator.policy import JobPolicy
from ulmfit_operator.runtime.kube import Kube, job_ref

from tests.harness.kube import ControlPlane, apply_manifests
from tests.harness.ports import wait_for
from tests.harness.s3 import SeaweedS3
from tests.harness.tools import Tool
from tests.integration.test_operator_harness import (  # noqa: F401 - fixtures
    GROUP,
    PLURAL,
    VERSION,
    admin,
    condition,
    create_job,
    events,
    get_job,
    is_true,
    job_spec,
    jobs_namespace,
    list_children,
    operator_crds,
    operator_kubeconfig,
    start_operator,
    wait_child,
    wait_job,
)

pytestmark = pytest.mark.timeout(300)

CHART = Path(__file__).resolve().parents[2] / "charts" / "ulmfit-operator"
ADMISSION = "/apis/admissionregistration.k8s.io/v1"
DIGEST = "sha256:" + "0123456789abcdef" * 4
PATTERNS = [
    "ghcr.io/ulmfit-operator/trainer",
    "registry.example.com/ml/*",
    "localhost:5000/trainer:dev",
]
IMAGES = [
    ("ghcr.io/ulmfit-operator/trainer:0.1.0", True),
    ("ghcr.io/ulmfit-operator/trainer", True),
    (f"ghcr.io/ulmfit-operator/trainer@{DIGEST}", True),
    (f"ghcr.io/ulmfit-operator/trainer:0.1.0@{DIGEST}", True),
    ("registry.example.com/ml/trainer:7", True),
    ("registry.example.com/ml/team/trainer:7", True),
    ("localhost:5000/trainer:dev", True),
    ("ghcr.io/ulmfit-operator/trainer-evil:0.1.0", False),
    ("ghcr.io/ulmfit-operator/trainer:0.1.0/evil", False),
    ("ghcr.io/ulmfit-operator/trainer@sha256:beef", False),
    ("ghcrXio/ulmfit-operator/trainer:0.1.0", False),
    ("evil.example/ghcr.io/ulmfit-operator/trainer:0.1.0", False),
    ("registry.example.com/mlx/trainer:7", False),
    ("localhost:5000/trainer:dev2", False),
    ("docker.io/attacker/miner:latest", False),
]
DISALLOWED = "docker.io/attacker/miner:latest"


# ------------------------------------------------------------------------ the admission policy


def job_body(namespace: str, name: str, image: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "storage": {"s3": {"endpoint": "http://minio:9000", "bucket": "ulmfit"}},
    }
    if image is not None:
        spec["resources"] = {"image": image}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ULMFiTJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def jobs_path(namespace: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"


def denial(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message", error.body))
    except ValueError:
        return str(error.body)


def try_create(kube: Kube, body: dict[str, Any], dry_run: bool = False) -> str | None:
    """None when the API server admits the job, else its message."""
    query = [("dryRun", "All")] if dry_run else None
    try:
        kube.request("POST", jobs_path(body["metadata"]["namespace"]), body, query=query)
    except ApiException as error:
        assert error.status in (403, 422), error
        return denial(error)
    return None


def try_patch(kube: Kube, namespace: str, name: str, patch: dict[str, Any]) -> str | None:
    try:
        kube.merge_patch(job_ref(namespace, name), patch)
    except ApiException as error:
        assert error.status in (403, 422), error
        return denial(error)
    return None


def render_policy(helm: Tool, namespace: str, *args: str) -> list[dict[str, Any]]:
    release = f"p{secrets.token_hex(3)}"
    rendered = helm.run(
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--show-only",
        "templates/admissionpolicy.yaml",
        "--set-json",
        f"allowedTrainerImages={json.dumps(PATTERNS)}",
        *args,
    ).stdout
    objects = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert [o["kind"] for o in objects] == [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    return objects


@contextlib.contextmanager
def installed(
    kube_cluster: ControlPlane, kube: Kube, objects: list[dict[str, Any]], probe_namespace: str
) -> Iterator[None]:
    """The policy and its binding applied, until the API server enforces them; removed after."""
    with kube_cluster.api_client() as api:
        apply_manifests(api, objects)
    try:
        probe = job_body(probe_namespace, "probe", DISALLOWED)
        wait_for(
            lambda: try_create(kube, probe, dry_run=True) is not None,
            60,
            "the API server to enforce the admission policy",
            interval=0.2,
        )
        yield
    finally:
        for obj in reversed(objects):
            plural = obj["kind"].lower() + "s"
            with contextlib.suppress(ApiException):
                kube.request("DELETE", f"{ADMISSION}/{plural}/{obj['metadata']['name']}")


@pytest.fixture
def other_namespace(admin: Kube, kube_namespace: str) -> Iterator[str]:
    """A second namespace (the binding of a namespace-scoped release does not cover it)."""
    name = f"other-{secrets.token_hex(4)}"
    admin.request(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    yield name
    with contextlib.suppress(ApiException):
        for item in admin.request("GET", jobs_path(name))["items"]:
            admin.delete(job_ref(name, item["metadata"]["name"]))
    with contextlib.suppress(ApiException):
        admin.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.mark.usefixtures("operator_crds")
@pytest.mark.parametrize("scope", ["namespace", "cluster"])
def test_the_charts_admission_policy_admits_only_allowed_trainer_images(
    helm: Tool,
    kube_cluster: ControlPlane,
    admin: Kube,
    jobs_namespace: str,
    other_namespace: str,
    scope: str,
) -> None:
    ns = jobs_namespace
    args = ["--set", f"rbac.scope={scope}"]
    if scope == "namespace":
        args += ["--set", f"watchNamespaces={{{ns}}}"]
    objects = render_policy(helm, ns, *args)
    # A job from before the policy, with an image the policy will not allow.
    assert try_create(admin, job_body(ns, "from-before", DISALLOWED)) is None
    operator = JobPolicy(trainer_images=tuple(PATTERNS))
    with installed(kube_cluster, admin, objects, ns):
        for index, (image, allowed) in enumerate(IMAGES):
            message = try_create(admin, job_body(ns, f"image-{index}", image))
            assert (message is None) == allowed, (image, message)
            # The operator's own check decides the same.
            assert operator.image_allowed(image) == allowed, image
            if message is not None:
                assert f"spec.resources.image {image} is not an allowed trainer image" in message
                assert "ghcr.io/ulmfit-operator/trainer[:TAG][@DIGEST]" in message
                assert "registry.example.com/ml/*" in message
                assert "allowedTrainerImages" in message

        # No image: the CRD's default, the project's trainer, which the patterns allow.
        assert try_create(admin, job_body(ns, "default-image", None)) is None
        stored = get_job(admin, ns, "default-image")
        assert stored["spec"]["resources"]["image"].startswith("ghcr.io/ulmfit-operator/trainer:")

        # An update that changes the image is judged like a create.
        swap = {"spec": {"resources": {"image": DISALLOWED}}}
        assert "is not an allowed trainer image" in (try_patch(admin, ns, "image-0", swap) or "")
        fine = {"spec": {"resources": {"image": "registry.example.com/ml/trainer:8"}}}
        assert try_patch(admin, ns, "image-0", fine) is None
        # One that keeps the image is not, so a job from before a narrower list stays editable;
        # only a new disallowed image is refused (and the operator refuses to run the old one).
        label = {"metadata": {"labels": {"team": "ml"}}}
        assert try_patch(admin, ns, "from-before", label) is None
        other = {"spec": {"resources": {"image": "docker.io/attacker/other:1"}}}
        assert try_patch(admin, ns, "from-before", other) is not None
        # Status writes (the operator's) are not subject to it.
        admin.merge_patch(
            job_ref(ns, "from-before"), {"status": {"progress": "checked"}}, sub="status"
        )

        # The binding of a namespace-scoped release covers its namespace only.
        elsewhere = try_create(admin, job_body(other_namespace, "elsewhere", DISALLOWED))
        assert (elsewhere is None) == (scope == "namespace"), elsewhere

    # Removed with the release: admitted again.
    wait_for(
        lambda: try_create(admin, job_body(ns, "probe", DISALLOWED), dry_run=True) is None,
        60,
        "the API server to drop the admission policy",
        interval=0.2,
    )


# ------------------------------------------------------------------------------- the operator


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP socket listening on loopback that nobody should connect to."""
    server = socket.create_server(("127.0.0.1", 0), backlog=16)
    server.setblocking(False)
    try:
        yield server
    finally:
        server.close()


def connections(server: socket.socket) -> int:
    """Connections that arrived (and were not yet accepted)."""
    count = 0
    while True:
        try:
            peer, _ = server.accept()
        except BlockingIOError:
            return count
        peer.close()
        count += 1


@pytest.mark.usefixtures("operator_crds")
def test_operator_refuses_a_store_or_image_it_does_not_allow_without_contacting_it(
    start_operator,
    admin: Kube,
    s3_server: SeaweedS3,
    s3_bucket: str,
    jobs_namespace: str,
    listener: socket.socket,
) -> None:
    ns = jobs_namespace
    port = listener.getsockname()[1]
    allowed_image = "ghcr.io/ulmfit-operator/trainer:0.2.0"
    operator = start_operator(
        extra_args=(
            f"--allowed-s3-endpoints={s3_server.url}",
            # Exact: the CRD's default image (…:0.1.0) is not allowed here.
            f"--allowed-trainer-images={allowed_image}",
        )
    )
    resources = {"cpu": "1", "memory": "1Gi", "image": allowed_image}
    elsewhere = f"http://127.0.0.1:{port}"
    create_job(
        admin,
        ns,
        "elsewhere",
        job_spec(
            s3_server,
            s3_bucket,
            storage={"s3": {"endpoint": elsewhere, "bucket": s3_bucket, "prefix": "runs"}},
            resources=resources,
        ),
    )
    create_job(
        admin,
        ns,
        "other-image",
        job_spec(s3_server, s3_bucket, resources={"cpu": "1", "memory": "1Gi"}),
    )
    create_job(admin, ns, "allowed", job_spec(s3_server, s3_bucket, resources=resources))

    # The allowed job runs: the operator is up, reconciling, and reads its (allowed) store.
    wait_child(admin, ns, "allowed-finetune-a1")

    failed = wait_job(
        admin, ns, "elsewhere", lambda j: is_true(j, "Failed"), "Failed (InvalidSpec)"
    )
    refused = condition(failed, "Failed") or {}
    assert refused["reason"] == "InvalidSpec"
    message = refused["message"]
    assert message.startswith("spec.storage.s3.endpoint: "), message
    assert f"'{elsewhere}'" in message
    assert f"allows only the S3 endpoints {s3_server.url}" in message
    assert failed["status"]["progress"] == "Failed: InvalidSpec"

    image = wait_job(
        admin, ns, "other-image", lambda j: is_true(j, "Failed"), "Failed (InvalidSpec)"
    )
    refused = condition(image, "Failed") or {}
    assert refused["reason"] == "InvalidSpec"
    assert refused["message"].startswith("spec.resources.image: "), refused["message"]
    assert "'ghcr.io/ulmfit-operator/trainer:0.1.0'" in refused["message"]
    assert allowed_image in refused["message"]

    warnings = wait_for(
        lambda: [e for e in events(admin, ns, "elsewhere") if e["reason"] == "InvalidSpec"],
        30,
        "the InvalidSpec event",
    )
    assert warnings[0]["type"] == "Warning"

    # Some resyncs later: still no child for either, and nothing ever connected to the endpoint.
    deadline = time.monotonic() + 4 * operator.resync_seconds + 1
    while time.monotonic() < deadline:
        assert connections(listener) == 0, "the operator connected to an endpoint it must not"
        time.sleep(0.2)
    assert list_children(admin, ns, "elsewhere") == []
    assert list_children(admin, ns, "other-image") == []
    assert connections(listener) == 0

    # The socket would have seen a connection: the check above can fail.
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        wait_for(lambda: connections(listener) == 1, 5, "the test's own connection")
