"""Kubeflow Trainer v2 and JobSet as host processes, with their webhooks really in the path.

Both are controller-runtime managers with an internal certificate rotator: the rotator writes a
serving certificate for `<service>.<namespace>.svc` into a Secret and the CA into the webhook
configurations it is told the names of, then waits for the certificate files to appear in a
directory fixed in its source (`/tmp/k8s-webhook-server/serving-certs`, where a pod would mount
the Secret). So each runs in its own mount namespace (`unshare --mount`, as Kueue does in
tests.harness.kueue) with a directory of its own bound onto that path, and `mount_certs` does
what the kubelet would: copy the Secret's files in. The Service of that name has one endpoint,
this host on the bridge, where the webhook server listens.

Neither finds a ServiceAccount namespace file on the host, so each uses its default namespace:
`kubeflow-system` (Trainer) and `jobset-system` (JobSet).

The webhook configurations are written here, not taken from the modules' kustomize trees (which
need kustomize to resolve): their names, paths and rules are the ones those trees give.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEBHOOK_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
"""Where controller-runtime's rotators (Trainer, JobSet, the Training Operator) wait for certs."""


@dataclass(frozen=True)
class Hook:
    """One admission webhook: its name, path, what it is called for."""

    name: str
    path: str
    group: str
    version: str
    resource: str
    operations: tuple[str, ...] = ("CREATE", "UPDATE")
    object_selector: dict[str, Any] | None = None


@dataclass(frozen=True)
class WebhookServer:
    """A manager's webhook server as the cluster reaches it."""

    namespace: str
    service: str
    secret: str
    validating: str
    mutating: str
    validate: tuple[Hook, ...]
    mutate: tuple[Hook, ...]

    def objects(self, host: str, port: int) -> list[dict[str, Any]]:
        """The Service (its one endpoint: `host:port`) and both webhook configurations."""
        return [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": self.service, "namespace": self.namespace},
                "spec": {"ports": [{"name": "webhook", "port": 443, "targetPort": port}]},
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{self.service}-host",
                    "namespace": self.namespace,
                    "labels": {"kubernetes.io/service-name": self.service},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [host], "conditions": {"ready": True}}],
                "ports": [{"name": "webhook", "port": port, "protocol": "TCP"}],
            },
            self._configuration("ValidatingWebhookConfiguration", self.validating, self.validate),
            self._configuration("MutatingWebhookConfiguration", self.mutating, self.mutate),
        ]

    def _configuration(self, kind: str, name: str, hooks: tuple[Hook, ...]) -> dict[str, Any]:
        def webhook(hook: Hook) -> dict[str, Any]:
            body: dict[str, Any] = {
                "name": hook.name,
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "rules": [
                    {
                        "apiGroups": [hook.group],
                        "apiVersions": [hook.version],
                        "operations": list(hook.operations),
                        "resources": [hook.resource],
                    }
                ],
                "clientConfig": {
                    "service": {
                        "name": self.service,
                        "namespace": self.namespace,
                        "path": hook.path,
                        "port": 443,
                    }
                },
            }
            if hook.object_selector is not None:
                body["objectSelector"] = hook.object_selector
            return body

        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": name},
            "webhooks": [webhook(hook) for hook in hooks],
        }


_TRAINER = ("trainer.kubeflow.org", "v1alpha1")
TRAINER = WebhookServer(
    namespace="kubeflow-system",
    service="kubeflow-trainer-controller-manager",
    secret="kubeflow-trainer-webhook-cert",
    validating="validator.trainer.kubeflow.org",
    mutating="defaulter.trainer.kubeflow.org",
    validate=(
        Hook(
            "validator.clustertrainingruntime.trainer.kubeflow.org",
            "/validate-trainer-kubeflow-org-v1alpha1-clustertrainingruntime",
            *_TRAINER,
            "clustertrainingruntimes",
        ),
        Hook(
            "validator.trainingruntime.trainer.kubeflow.org",
            "/validate-trainer-kubeflow-org-v1alpha1-trainingruntime",
            *_TRAINER,
            "trainingruntimes",
        ),
        Hook(
            "validator.trainjob.trainer.kubeflow.org",
            "/validate-trainer-kubeflow-org-v1alpha1-trainjob",
            *_TRAINER,
            "trainjobs",
        ),
    ),
    mutate=(
        Hook(
            "defaulter.trainjob.trainer.kubeflow.org",
            "/mutate-trainer-kubeflow-org-v1alpha1-trainjob",
            *_TRAINER,
            "trainjobs",
        ),
    ),
)

_JOBSET = ("jobset.x-k8s.io", "v1alpha2")
_JOBSET_PODS = {
    "matchExpressions": [{"key": "jobset.sigs.k8s.io/jobset-name", "operator": "Exists"}]
}
JOBSET = WebhookServer(
    namespace="jobset-system",
    service="jobset-webhook-service",
    secret="jobset-webhook-server-cert",
    validating="jobset-validating-webhook-configuration",
    mutating="jobset-mutating-webhook-configuration",
    validate=(
        Hook("vjobset.kb.io", "/validate-jobset-x-k8s-io-v1alpha2-jobset", *_JOBSET, "jobsets"),
        Hook("vpod.kb.io", "/validate--v1-pod", "", "v1", "pods", ("CREATE",), _JOBSET_PODS),
    ),
    mutate=(
        Hook("mjobset.kb.io", "/mutate-jobset-x-k8s-io-v1alpha2-jobset", *_JOBSET, "jobsets"),
        Hook("mpod.kb.io", "/mutate--v1-pod", "", "v1", "pods", ("CREATE",), _JOBSET_PODS),
    ),
)


def in_own_cert_dir(cert_dir: Path, argv: list[str]) -> list[str]:
    """`argv` run in a private mount namespace where `cert_dir` is bound onto
    `WEBHOOK_CERT_DIR`."""
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    return [
        "unshare",
        "--mount",
        "--propagation=private",
        "sh",
        "-c",
        script,
        "in-own-cert-dir",
        str(cert_dir),
        str(WEBHOOK_CERT_DIR),
        *argv,
    ]


def write_certs(secret_data: dict[str, str], cert_dir: Path) -> None:
    """The Secret's certificate files into `cert_dir`, as a Secret volume would hold them."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    for name, value in secret_data.items():
        path = cert_dir / name
        path.write_bytes(base64.b64decode(value))
        path.chmod(0o600)


def trainer_configuration(host: str, webhook_port: int, health: int) -> dict[str, Any]:
    """Trainer's Configuration: its rotator on, no leader election, listeners on this host (its
    status server starts only with the TrainJobStatus feature gate, which stays off)."""
    return {
        "apiVersion": "config.trainer.kubeflow.org/v1alpha1",
        "kind": "Configuration",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
        "metrics": {"bindAddress": "0"},  # off: nothing here scrapes it
        "webhook": {"host": host, "port": webhook_port},
        "leaderElection": {"leaderElect": False},
        "certManagement": {
            "enable": True,
            "webhookServiceName": TRAINER.service,
            "webhookSecretName": TRAINER.secret,
        },
    }


def jobset_configuration(host: str, webhook_port: int, health: int) -> dict[str, Any]:
    """JobSet's Configuration: its rotator on, no leader election, listeners on this host."""
    return {
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
        "kind": "Configuration",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
        "metrics": {"bindAddress": "0"},  # off: nothing here scrapes it
        "webhook": {"host": host, "port": webhook_port},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {
            "enable": True,
            "webhookServiceName": JOBSET.service,
            "webhookSecretName": JOBSET.secret,
        },
    }
