"""Pure: the Service `<job>-tune-dashboard` in front of the tune stage's Ray dashboard (port
8265), owned by the job. Built only: nothing reads it back.
"""

from __future__ import annotations

from ulmfit_operator.children.common import (
    DASHBOARD_PORT,
    DASHBOARD_PORT_NAME,
    ROLE_RAY_HEAD,
    Body,
    Owner,
    _owned_metadata,
    dashboard_service_name,
)
from ulmfit_operator.plan import TUNE_KEY

SERVICE_KIND = "Service"


def dashboard_service(owner: Owner) -> Body:
    """ClusterIP Service on port 8265 in front of the pod with the Ray head (any attempt's)."""
    return {
        "apiVersion": "v1",
        "kind": SERVICE_KIND,
        "metadata": _owned_metadata(
            owner, dashboard_service_name(owner.name), owner.labels(TUNE_KEY)
        ),
        "spec": {
            "ports": [
                {
                    "name": DASHBOARD_PORT_NAME,
                    "port": DASHBOARD_PORT,
                    "protocol": "TCP",
                    "targetPort": DASHBOARD_PORT_NAME,
                }
            ],
            "selector": owner.labels(TUNE_KEY, role=ROLE_RAY_HEAD),
            "type": "ClusterIP",
        },
    }
