"""Pure: the NetworkPolicy `<job>-pods` that fences a job's pods, with the operator's
`--job-network-policy isolate` (see `network_policy`). Built only: nothing reads it back.
"""

from __future__ import annotations

from ulmfit_operator.children.common import (
    DASHBOARD_PORT,
    LABEL_JOB,
    Body,
    Owner,
    _owned_metadata,
    network_policy_name,
)
from ulmfit_operator.policy import PodNetwork

NETWORKPOLICY_API_VERSION = "networking.k8s.io/v1"
NETWORKPOLICY_KIND = "NetworkPolicy"


def network_policy(owner: Owner, s3_port: int, network: PodNetwork) -> Body:
    """The NetworkPolicy around a job's pods (all of them: every stage, attempt and role).

    Ingress: from the job's own pods (torchrun's rendezvous, Ray's head and workers, the RayJob
    submitter), and the Ray dashboard port from the KubeRay operator's pods. Egress: to the job's
    own pods, DNS (port 53, wherever the cluster's resolver is) and the S3 endpoint's port at
    `network.s3_cidrs`. Nothing else: the pods hold the job's S3 keys.
    """

    def own() -> list[Body]:
        return [{"podSelector": {"matchLabels": {LABEL_JOB: owner.name}}}]

    ingress: list[Body] = [{"from": own()}]
    if network.ray_operator_labels:
        ingress.append(
            {
                "from": [
                    {
                        "namespaceSelector": {},
                        "podSelector": {"matchLabels": dict(network.ray_operator_labels)},
                    }
                ],
                "ports": [{"port": DASHBOARD_PORT, "protocol": "TCP"}],
            }
        )
    egress: list[Body] = [
        {"to": own()},
        {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
    ]
    if network.s3_cidrs:
        egress.append(
            {
                "ports": [{"port": s3_port, "protocol": "TCP"}],
                "to": [{"ipBlock": {"cidr": cidr}} for cidr in network.s3_cidrs],
            }
        )
    return {
        "apiVersion": NETWORKPOLICY_API_VERSION,
        "kind": NETWORKPOLICY_KIND,
        "metadata": _owned_metadata(owner, network_policy_name(owner.name), owner.labels()),
        "spec": {
            "egress": egress,
            "ingress": ingress,
            "podSelector": {"matchLabels": {LABEL_JOB: owner.name}},
            "policyTypes": ["Ingress", "Egress"],
        },
    }
