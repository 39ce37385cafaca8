"""The terminal commands' API access: the user's kubeconfig, plain-JSON calls, clear errors.

Like `kubectl`, it reads `--kubeconfig`, else `$KUBECONFIG` (paths joined by `:` are merged),
else `~/.kube/config`, else the in-cluster service account; the namespace defaults to the
context's. Every failure becomes a `TerminalError` whose message names the object, the
namespace and, when RBAC refused, the verb and resource.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from ulmfit_operator.api import API_VERSION, KIND, PLURAL
from ulmfit_operator.runtime.kube import resource_path

DEFAULT_KUBECONFIG = "~/.kube/config"
USER_AGENT = "ulmfit-terminal"
TIMEOUT = 30.0


class TerminalError(Exception):
    """A failure to report in one sentence (no traceback) and exit 1."""


@dataclass(frozen=True)
class Target:
    """Where the commands act: the kubeconfig file(s), its context and the namespace."""

    kubeconfig: str | None
    context: str | None
    namespace: str


def kubeconfig_paths(explicit: str | None) -> str | None:
    """The kubeconfig to load (`--kubeconfig`, `$KUBECONFIG`, `~/.kube/config`), or None when
    none of those exists."""
    if explicit:
        if not Path(explicit).expanduser().is_file():
            raise TerminalError(f"no kubeconfig at {explicit} (given with --kubeconfig)")
        return explicit
    from_env = os.environ.get("KUBECONFIG", "")
    paths = [p for p in from_env.split(os.pathsep) if p and Path(p).expanduser().is_file()]
    if paths:
        return os.pathsep.join(paths)
    default = Path(DEFAULT_KUBECONFIG).expanduser()
    return str(default) if default.is_file() else None


def _no_kubeconfig() -> TerminalError:
    where = f"$KUBECONFIG ({os.environ['KUBECONFIG']})" if os.environ.get("KUBECONFIG") else ""
    looked = " or ".join(filter(None, [where, DEFAULT_KUBECONFIG]))
    return TerminalError(
        f"no kubeconfig found (looked at {looked}, and this is not a pod): "
        "pass --kubeconfig FILE or set KUBECONFIG"
    )


def _context_namespace(path: str, context: str | None) -> str:
    contexts, active = kube_config.list_kube_config_contexts(config_file=path)
    chosen = active
    if context is not None:
        chosen = next((c for c in contexts or [] if c.get("name") == context), None)
        if chosen is None:
            raise TerminalError(f"context {context!r} is not in the kubeconfig {path}")
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")


def _in_cluster_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else "default"


def connect(
    kubeconfig: str | None, context: str | None, namespace: str | None
) -> tuple[ApiClient, Target]:
    """An API client for the kubeconfig (or the pod's account) and where it acts."""
    configuration = Configuration()
    path = kubeconfig_paths(kubeconfig)
    try:
        if path is not None:
            kube_config.load_kube_config(
                config_file=path, context=context, client_configuration=configuration
            )
            default_namespace = _context_namespace(path, context)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config(client_configuration=configuration)
            default_namespace = _in_cluster_namespace()
        else:
            raise _no_kubeconfig()
    except kube_config.ConfigException as error:
        raise TerminalError(f"cannot use the kubeconfig {path}: {error}") from None
    client = ApiClient(configuration)
    client.user_agent = USER_AGENT
    # Only an explicit --kubeconfig is handed on (to kubectl): otherwise it resolves the same way.
    return client, Target(kubeconfig, context, namespace or default_namespace)


def _server_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except (ValueError, AttributeError):
        return str(error.reason or error.body)


class Cluster:
    """Plain-JSON calls for the terminal commands, in one namespace."""

    def __init__(self, api: ApiClient, target: Target) -> None:
        self.api = api
        self.target = target
        self.namespace = target.namespace

    def close(self) -> None:
        self.api.close()

    # -- transport

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = TIMEOUT,
    ) -> Any:
        method, url, headers, data, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json, */*"},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api.call_api(
                method, url, header_params=headers, body=data, _request_timeout=timeout
            )
        except HTTPError as error:
            raise TerminalError(
                f"cannot reach the API server at {self.api.configuration.host}: {error}"
            ) from None
        if response.status >= 400:
            response.read()
            raise ApiException(http_resp=response)
        return response

    def request(self, method: str, path: str, action: str, **options: Any) -> Any:
        """One call; `action` (`get ulmfitjobs "x"`) names it in the error when RBAC refuses."""
        try:
            raw = self._call(method, path, **options).read()
        except ApiException as error:
            raise self._explain(error, action) from None
        return json.loads(raw) if raw else None

    def _explain(self, error: ApiException, action: str) -> Exception:
        where = f"in namespace {self.namespace}"
        if error.status == 403:
            return TerminalError(
                f"forbidden: your kubeconfig's user may not {action} {where} "
                f"(the API server said: {_server_message(error)})"
            )
        if error.status == 401:
            return TerminalError(
                f"unauthorized: the API server rejected the kubeconfig's credentials ({action})"
            )
        return error  # the caller decides what a 404 means

    # -- jobs

    def _job_path(self, name: str | None = None, sub: str | None = None) -> str:
        return resource_path(API_VERSION, PLURAL, self.namespace, name, sub)

    def get_job(self, name: str) -> dict[str, Any]:
        try:
            job = self.request("GET", self._job_path(name), f'get {PLURAL} "{name}"')
        except ApiException as error:
            raise self._missing(error, name) from None
        return job  # type: ignore[no-any-return]

    def list_jobs(self) -> list[dict[str, Any]]:
        try:
            return self.list_objects(API_VERSION, PLURAL)
        except ApiException as error:
            if error.status == 404:
                raise TerminalError(
                    f"the API server does not serve {PLURAL}.{API_VERSION.split('/')[0]}: "
                    "is the ULMFiTJob CRD installed?"
                ) from None
            raise

    def patch_job(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.request(  # type: ignore[no-any-return]
                "PATCH",
                self._job_path(name),
                f'patch {PLURAL} "{name}"',
                body=patch,
                content_type="application/merge-patch+json",
            )
        except ApiException as error:
            raise self._missing(error, name) from None

    def _missing(self, error: ApiException, name: str) -> Exception:
        if error.status == 404:
            return TerminalError(f"{KIND} {name!r} not found in namespace {self.namespace}")
        return TerminalError(f"{KIND} {self.namespace}/{name}: {_server_message(error)}")

    # -- anything

    def list_objects(
        self, api_version: str, plural: str, selector: str | None = None
    ) -> list[dict[str, Any]]:
        """Every object of a kind in the namespace (all pages); ApiException for a 404."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            query = [("limit", "500")]
            if selector:
                query.append(("labelSelector", selector))
            if token:
                query.append(("continue", token))
            path = resource_path(api_version, plural, self.namespace)
            page = self.request("GET", path, f"list {plural}", query=query)
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                return items

    def list_quietly(
        self, api_version: str, plural: str, selector: str | None = None
    ) -> list[dict[str, Any]]:
        """Like `list`, but a kind the server lacks (404) or the user may not list (403) is
        simply empty: `describe` shows what it can see."""
        try:
            return self.list_objects(api_version, plural, selector)
        except (ApiException, TerminalError):
            return []

    def stream_log(self, pod: str, container: str | None, follow: bool) -> Iterator[str]:
        """A pod's log, line by line; with `follow`, until the container ends."""
        query = [("follow", "true" if follow else "false")]
        if container:
            query.append(("container", container))
        path = resource_path("v1", "pods", self.namespace, pod, "log")
        try:
            response = self._call("GET", path, query=query, timeout=None if follow else TIMEOUT)
        except ApiException as error:
            explained = self._explain(error, f'get pods/log "{pod}"')
            if isinstance(explained, TerminalError):
                raise explained from None
            raise TerminalError(f"pod {pod}: {_server_message(error)}") from None
        yield from _lines(response.response)


def _lines(raw: Any) -> Iterator[str]:
    """Complete lines from a urllib3 response as they arrive (the last one even unterminated)."""
    pending = b""
    try:
        for chunk in raw.stream(4096, decode_content=True):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.decode(errors="replace")
        if pending:
            yield pending.decode(errors="replace")
    finally:
        raw.release_conn()
