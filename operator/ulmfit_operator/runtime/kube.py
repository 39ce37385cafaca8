"""The API server client: `Kube` (plain-JSON calls, each write counted) and object paths.

No model (de)serialization: bodies are the JSON the server sends and takes. `resource_path` and
`PLURALS` name where each kind the operator touches lives; `job_ref` is a ULMFiTJob's reference,
`merge_patch_for` the RFC 7386 patch between two objects, and `connect` the client of this
process (in-cluster credentials, else the kubeconfig).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

from ulmfit_operator.api import API_VERSION, GROUP, KIND, PLURAL
from ulmfit_operator.children import (
    JOB_API_VERSION,
    NETWORKPOLICY_API_VERSION,
    NETWORKPOLICY_KIND,
    OPTIONAL_KINDS,
    SERVICE_KIND,
    ChildRef,
)
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.reconcile import Event
from ulmfit_operator.status import format_time

COMPONENT = "ulmfit-operator"
"""The operator's name as the API sees it: events' source, the client's user agent."""


def resource_path(
    api_version: str,
    plural: str,
    namespace: str | None,
    name: str | None = None,
    sub: str | None = None,
) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Event"): "events",
    ("v1", SERVICE_KIND): "services",
    (NETWORKPOLICY_API_VERSION, NETWORKPOLICY_KIND): "networkpolicies",
    # TrainJob, PyTorchJob, RayJob
    **{(api_version, kind): plural for kind, (api_version, plural) in OPTIONAL_KINDS.items()},
    (JOB_API_VERSION, "Job"): "jobs",
    (API_VERSION, KIND): PLURAL,
    ("coordination.k8s.io/v1", "Lease"): "leases",
}
"""(apiVersion, kind) -> the resource's plural, for every kind the operator reads or writes."""

_KNOWN_PLURALS = frozenset(PLURALS.values())


class Kube:
    """Plain-JSON calls to the API server (no model (de)serialization), each write counted."""

    def __init__(self, api_client: ApiClient, metrics: OperatorMetrics, timeout: float = 30.0):
        self.api = api_client
        self.metrics = metrics
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        method, url, headers, data, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(
            method, url, header_params=headers, body=data, _request_timeout=self.timeout
        )
        raw = response.read()
        if response.status >= 400:
            raise ApiException(http_resp=response)
        if method != "GET":
            resource = path.split("?")[0].rstrip("/").split("/")
            plural = next(
                (part for part in reversed(resource) if part in _KNOWN_PLURALS), resource[-1]
            )
            self.metrics.api_writes.labels(method.lower(), plural).inc()
        return json.loads(raw) if raw else None

    # -- objects

    def create(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create; None when it already exists (a deterministic name: someone made it first)."""
        meta = body["metadata"]
        plural = PLURALS[(body["apiVersion"], body["kind"])]
        path = resource_path(body["apiVersion"], plural, meta.get("namespace"))
        try:
            return self.request("POST", path, dict(body))  # type: ignore[no-any-return]
        except ApiException as error:
            if error.status == 409:
                return None
            raise

    def delete(self, ref: ChildRef, uid: str | None = None) -> None:
        plural = PLURALS[(ref.api_version, ref.kind)]
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request(
                "DELETE", resource_path(ref.api_version, plural, ref.namespace, ref.name), body
            )
        except ApiException as error:
            if error.status not in (404, 409):
                raise

    def merge_patch(
        self, ref: ChildRef, patch: Mapping[str, Any], sub: str | None = None
    ) -> dict[str, Any]:
        plural = PLURALS[(ref.api_version, ref.kind)]
        path = resource_path(ref.api_version, plural, ref.namespace, ref.name, sub)
        result = self.request(
            "PATCH", path, dict(patch), content_type="application/merge-patch+json"
        )
        return result  # type: ignore[no-any-return]

    def get(self, ref: ChildRef) -> dict[str, Any]:
        plural = PLURALS[(ref.api_version, ref.kind)]
        path = resource_path(ref.api_version, plural, ref.namespace, ref.name)
        return self.request("GET", path)  # type: ignore[no-any-return]

    def list(
        self, api_version: str, plural: str, namespace: str | None, selector: str
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query = [("labelSelector", selector), ("limit", "500")]
            if token:
                query.append(("continue", token))
            page = self.request("GET", resource_path(api_version, plural, namespace), query=query)
            kind = str(page.get("kind", "")).removesuffix("List")
            for item in page.get("items") or []:
                item.setdefault("apiVersion", api_version)
                item.setdefault("kind", kind)
                items.append(item)
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                return items

    def event(self, job: Mapping[str, Any], event: Event, instance: str) -> None:
        meta = job["metadata"]
        now = format_time(datetime.now(UTC))
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": COMPONENT},
            "reportingComponent": f"{GROUP}/operator",
            "reportingInstance": instance[:128],
        }
        self.request("POST", resource_path("v1", "events", meta["namespace"]), body)


def job_ref(namespace: str, name: str) -> ChildRef:
    return ChildRef(API_VERSION, KIND, namespace, name)


def merge_patch_for(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The RFC 7386 merge patch that turns `old` into `new` (keys only in `old` become null)."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            nested = merge_patch_for(before, value)
            if nested:
                patch[key] = nested
        elif key not in old or before != value:
            patch[key] = value
    return patch


def connect(pool_size: int) -> ApiClient:
    """This process's API client: in-cluster credentials, else the kubeconfig."""
    configuration = Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException:
        kube_config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    client = ApiClient(configuration)
    client.user_agent = f"{COMPONENT}/{_version()}"
    return client


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ulmfit-operator")
    except PackageNotFoundError:
        return "dev"
