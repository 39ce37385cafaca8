"""The controller's I/O edge: kopf watches, a work queue, the store, the API, leader election.

kopf watches ULMFiTJobs and their children and keeps the operator alive (health endpoint,
reconnects); its event handlers only update an in-memory view and queue the job. Worker threads
take jobs off the queue one at a time per job, read what `reconcile.reconcile` asks for from the
store, and apply its decision: create/stop/delete children, one status patch (with the
resourceVersion read, so a stale view cannot overwrite a newer status), then events. A resync
tick re-queues every unfinished job so store-side progress is seen without any Kubernetes event.

kopf timers would do the resync too, but kopf puts a finalizer on every object that has a timer
(one more write per job, and deleting a job waits for a running operator); one tick over the
in-memory view does the same with neither.

Only one replica acts: it holds a `coordination.k8s.io` Lease (client-go's leader election).
Standbys keep watching (warm caches) but do not reconcile; a leader that cannot renew exits.
Restarting with the same identity (a container restart in the same pod) takes the lease back at
once. Deterministic child names make even an overlap harmless: a second create is a 409.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import ctypes
import heapq
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException
from ulmfit_trainer.store import CheckpointStore, S3Settings, Store, open_store

from ulmfit_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.reconcile import (
    CreateObject,
    Decision,
    DeleteChild,
    DeleteJob,
    Event,
    FinalCheckpoint,
    NeedStore,
    Observation,
    StopChild,
    final_checkpoint,
    reconcile,
)
from ulmfit_operator.status import format_time
from ulmfit_operator.workloads import (
    JOB_API_VERSION,
    LABEL_JOB,
    PYTORCHJOB_API_VERSION,
    PYTORCHJOB_PLURAL,
    RAYJOB_API_VERSION,
    RAYJOB_KIND,
    RAYJOB_PLURAL,
    SERVICE_KIND,
    Child,
    ChildRef,
    observe_child,
    stop_patch,
)

log = logging.getLogger("ulmfit_operator")

Key = tuple[str, str]
"""(namespace, name) of a ULMFiTJob."""

COMPONENT = "ulmfit-operator"
FINISHED = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str | None = None
    """Watch only this namespace (None: the whole cluster)."""
    standalone: bool = False
    """No leader election: for a single replica (and local runs)."""
    metrics_port: int = 8000
    metrics_address: str = "0.0.0.0"
    health_port: int = 8080
    health_address: str = "0.0.0.0"
    resync_seconds: float = 30.0
    """How often every unfinished job is looked at again (store progress, deadlines)."""
    workers: int = 16
    """Reconciles in flight at once (each one job; they mostly wait on the API and S3)."""
    lease_name: str = "ulmfit-operator"
    lease_namespace: str | None = None
    """Where the leader Lease lives: default the watched namespace, else the pod's namespace."""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    identity: str | None = None
    """This replica's name in the Lease (default: the pod name, or host name + random)."""


# ---------------------------------------------------------------------------------- API access


def _resource_path(
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


_PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Event"): "events",
    ("v1", SERVICE_KIND): "services",
    (RAYJOB_API_VERSION, RAYJOB_KIND): RAYJOB_PLURAL,
    (PYTORCHJOB_API_VERSION, "PyTorchJob"): PYTORCHJOB_PLURAL,
    (JOB_API_VERSION, "Job"): "jobs",
    (API_VERSION, KIND): PLURAL,
    ("coordination.k8s.io/v1", "Lease"): "leases",
}


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
        plural = _PLURALS[(body["apiVersion"], body["kind"])]
        path = _resource_path(body["apiVersion"], plural, meta.get("namespace"))
        try:
            return self.request("POST", path, dict(body))  # type: ignore[no-any-return]
        except ApiException as error:
            if error.status == 409:
                return None
            raise

    def delete(self, ref: ChildRef, uid: str | None = None) -> None:
        plural = _PLURALS[(ref.api_version, ref.kind)]
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request(
                "DELETE", _resource_path(ref.api_version, plural, ref.namespace, ref.name), body
            )
        except ApiException as error:
            if error.status not in (404, 409):
                raise

    def merge_patch(
        self, ref: ChildRef, patch: Mapping[str, Any], sub: str | None = None
    ) -> dict[str, Any]:
        plural = _PLURALS[(ref.api_version, ref.kind)]
        path = _resource_path(ref.api_version, plural, ref.namespace, ref.name, sub)
        result = self.request(
            "PATCH", path, dict(patch), content_type="application/merge-patch+json"
        )
        return result  # type: ignore[no-any-return]

    def get(self, ref: ChildRef) -> dict[str, Any]:
        plural = _PLURALS[(ref.api_version, ref.kind)]
        path = _resource_path(ref.api_version, plural, ref.namespace, ref.name)
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
            page = self.request("GET", _resource_path(api_version, plural, namespace), query=query)
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
        self.request("POST", _resource_path("v1", "events", meta["namespace"]), body)


_KNOWN_PLURALS = frozenset(plural for plural in _PLURALS.values())


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


# ------------------------------------------------------------------------------------- caches


class View:
    """What the operator knows of the cluster: jobs and their children, fed by watches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[Key, dict[str, Any]] = {}
        self._children: dict[Key, dict[str, Child]] = {}
        self._states: dict[Key, str] = {}

    def put_job(self, body: dict[str, Any]) -> Key:
        meta = body["metadata"]
        meta.pop("managedFields", None)  # large, and nothing here reads it
        key = (meta["namespace"], meta["name"])
        with self._lock:
            self._jobs[key] = body
        return key

    def drop_job(self, key: Key) -> None:
        with self._lock:
            self._jobs.pop(key, None)
            self._states.pop(key, None)

    def job(self, key: Key) -> dict[str, Any] | None:
        with self._lock:
            return self._jobs.get(key)

    def job_keys(self) -> list[Key]:
        with self._lock:
            return list(self._jobs)

    def put_child(self, child: Child) -> tuple[Key, bool]:
        """Remember a child; also says whether anything reconcile looks at changed."""
        key = (child.namespace, child.job)
        with self._lock:
            children = self._children.setdefault(key, {})
            before = children.get(child.name)
            children[child.name] = child
        changed = before is None or _relevant(before) != _relevant(child)
        return key, changed

    def drop_child(self, namespace: str, job: str, name: str) -> Key:
        key = (namespace, job)
        with self._lock:
            children = self._children.get(key, {})
            children.pop(name, None)
            if not children:
                self._children.pop(key, None)
        return key

    def children(self, key: Key) -> list[Child]:
        with self._lock:
            return list(self._children.get(key, {}).values())

    def set_state(self, key: Key, state: str) -> None:
        with self._lock:
            if key in self._jobs:
                self._states[key] = state

    def state(self, key: Key) -> str | None:
        with self._lock:
            return self._states.get(key)

    def counts(self) -> dict[str, int]:
        with self._lock:
            counts: dict[str, int] = {}
            for key in self._jobs:
                state = self._states.get(key, "Pending")
                counts[state] = counts.get(state, 0) + 1
            return counts


def _relevant(child: Child) -> tuple[Any, ...]:
    return (
        child.phase,
        child.message,
        child.deleting,
        child.stopped,
        child.started,
        child.owner_uid,
    )


class WorkQueue:
    """client-go's work queue: a key is queued once, and processed by one worker at a time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[Key] = deque()
        self._dirty: set[Key] = set()
        self._processing: set[Key] = set()
        self._delayed: list[tuple[float, int, Key]] = []
        self._counter = 0
        self._failures: dict[Key, int] = {}
        self._closed = False
        self._timer = threading.Thread(target=self._release_delayed, daemon=True, name="requeue")
        self._timer.start()

    def add(self, key: Key) -> None:
        with self._cond:
            if self._closed or key in self._dirty:
                return
            self._dirty.add(key)
            if key not in self._processing:
                self._queue.append(key)
                self._cond.notify_all()

    def add_after(self, key: Key, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            self._counter += 1
            heapq.heappush(self._delayed, (time.monotonic() + delay, self._counter, key))
            self._cond.notify_all()

    def add_rate_limited(self, key: Key, base: float = 0.5, cap: float = 60.0) -> float:
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
        delay = min(cap, base * 2**failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Key) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def get(self) -> Key | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key = self._queue.popleft()
            self._processing.add(key)
            self._dirty.discard(key)
            return key

    def done(self, key: Key) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _release_delayed(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                due = []
                while self._delayed and self._delayed[0][0] <= now:
                    due.append(heapq.heappop(self._delayed)[2])
                wait = self._delayed[0][0] - now if self._delayed else None
                if not due:
                    self._cond.wait(timeout=wait)
                    continue
            for key in due:
                self.add(key)


# -------------------------------------------------------------------------------------- store


class StoreReader:
    """Reads final checkpoints and progress with the operator's own S3 credentials."""

    ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
    SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
    SESSION_TOKEN_ENV = "AWS_SESSION_TOKEN"

    def __init__(self, metrics: OperatorMetrics):
        self.metrics = metrics
        self._lock = threading.Lock()
        self._stores: dict[S3Settings, Store] = {}

    def _store(self, s3: S3Settings) -> Store:
        # The job names the bucket; the credentials are the operator's (from its environment),
        # and a reconcile should not sit in long retries: the next resync tries again.
        tuned = s3.model_copy(
            update={
                "access_key_env": self.ACCESS_KEY_ENV,
                "secret_key_env": self.SECRET_KEY_ENV,
                "session_token_env": self.SESSION_TOKEN_ENV,
                "create_bucket": False,
                "max_attempts": 2,
                "retry_base_delay": 0.2,
                "retry_max_delay": 1.0,
                "timeout_seconds": 10.0,
            }
        )
        with self._lock:
            store = self._stores.get(tuned)
            if store is None:
                store = open_store(tuned.root, tuned)
                self._stores[tuned] = store
            return store

    def final(self, s3: S3Settings, run: str, stage: str) -> FinalCheckpoint | None:
        self.metrics.store_reads.labels("checkpoint").inc()
        final = CheckpointStore(self._store(s3), run).final(stage)
        if final is None:
            return None
        return final_checkpoint(final.uri, final.created_at, final.meta)

    def progress(self, s3: S3Settings, run: str, stage: str) -> dict[str, Any] | None:
        self.metrics.store_reads.labels("progress").inc()
        return CheckpointStore(self._store(s3), run).read_progress(stage)


# ------------------------------------------------------------------------------ leader election


def _micro_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Lease-based leader election, after client-go's `leaderelection` package.

    A candidate takes the Lease when it is free, its own, or not renewed for `lease_duration`
    as measured on the candidate's own clock from when it last saw the record change (so clock
    skew between replicas does not matter). The leader renews every `retry_period`; if it has not
    renewed within `renew_deadline` it stops leading (`on_lost`).
    """

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float,
        renew_deadline: float,
        retry_period: float,
        on_started: Callable[[], None],
        on_lost: Callable[[], None],
    ):
        self.kube = kube
        self.ref = ChildRef("coordination.k8s.io/v1", "Lease", namespace, name)
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_started = on_started
        self.on_lost = on_lost
        self._leading = False
        self._renewed = 0.0
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._stop = threading.Event()

    def is_leader(self) -> bool:
        return self._leading and time.monotonic() - self._renewed < self.renew_deadline

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                ok = self._try_acquire_or_renew()
            except Exception as error:  # API hiccups: keep trying until the deadline
                log.warning("leader election: %s", error)
                ok = False
            if ok:
                self._renewed = time.monotonic()
                if not self._leading:
                    self._leading = True
                    log.info("became leader (lease %s/%s)", self.ref.namespace, self.ref.name)
                    self.on_started()
            elif self._leading and time.monotonic() - self._renewed >= self.renew_deadline:
                self._leading = False
                log.error("lost the leader lease %s/%s", self.ref.namespace, self.ref.name)
                self.on_lost()
            self._stop.wait(self.retry_period)

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if release and self._leading:
            with contextlib.suppress(Exception):
                lease = self.kube.get(self.ref)
                if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                    lease["spec"]["holderIdentity"] = None
                    lease["spec"]["leaseDurationSeconds"] = 1
                    self._put(lease)
            self._leading = False

    def _put(self, lease: dict[str, Any]) -> None:
        path = _resource_path(self.ref.api_version, "leases", self.ref.namespace, self.ref.name)
        self.kube.request("PUT", path, lease)

    def _try_acquire_or_renew(self) -> bool:
        now = datetime.now(UTC)
        try:
            lease = self.kube.get(self.ref)
        except ApiException as error:
            if error.status != 404:
                raise
            body = {
                "apiVersion": self.ref.api_version,
                "kind": "Lease",
                "metadata": {"name": self.ref.name, "namespace": self.ref.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": int(self.lease_duration),
                    "acquireTime": _micro_time(now),
                    "renewTime": _micro_time(now),
                    "leaseTransitions": 0,
                },
            }
            return self.kube.create(body) is not None
        spec = lease.setdefault("spec", {})
        holder = spec.get("holderIdentity")
        record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        if holder and holder != self.identity:
            duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
            if time.monotonic() - self._observed_at < duration:
                return False
        if holder != self.identity:
            spec["acquireTime"] = _micro_time(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec["holderIdentity"] = self.identity
        spec["leaseDurationSeconds"] = int(self.lease_duration)
        spec["renewTime"] = _micro_time(now)
        try:
            self._put(lease)  # carries the resourceVersion read: a concurrent taker gets a 409
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True


# --------------------------------------------------------------------------------- controller


class Conflict(Exception):
    """The job changed since it was read; read it again and decide again."""


class Controller:
    def __init__(
        self,
        kube: Kube,
        stores: StoreReader,
        metrics: OperatorMetrics,
        config: OperatorConfig,
        identity: str,
    ):
        self.kube = kube
        self.stores = stores
        self.metrics = metrics
        self.config = config
        self.identity = identity
        self.view = View()
        self.queue = WorkQueue()
        self._written: dict[Key, str] = {}
        self._written_lock = threading.Lock()
        self.is_leader: Callable[[], bool] = lambda: True
        self.rayjob_available = False
        """The RayJob CRD was served when the operator started (kopf watches what it finds then,
        so a KubeRay installed later is used after a restart)."""
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        # Events are posted off the reconcile path: a reconcile is done once its status landed.
        self._events = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="events")
        metrics.count_jobs_with(self.view.counts)

    # -- feeding the view (called from kopf handlers: no I/O)

    def job_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if event_type == "DELETED":
            self.view.drop_job(key)
            with self._written_lock:
                self._written.pop(key, None)
            return
        self.view.put_job(body)
        with self._written_lock:
            ours = self._written.get(key) == meta.get("resourceVersion")
        if not ours:  # our own status patch needs no second look
            self.queue.add(key)

    def child_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        child = observe_child(body)
        if child is None:
            return
        if event_type == "DELETED":
            key = self.view.drop_child(child.namespace, child.job, child.name)
            changed = True
        else:
            key, changed = self.view.put_child(child)
        if changed and self.view.job(key) is not None:
            self.queue.add(key)

    def discover_rayjob(self) -> bool:
        """Whether the API serves RayJobs (discovery: every authenticated client may read it)."""
        try:
            found = self.kube.request("GET", f"/apis/{RAYJOB_API_VERSION}")
        except ApiException as error:
            if error.status in (403, 404):
                return False
            raise
        return any(r.get("name") == RAYJOB_PLURAL for r in (found or {}).get("resources") or [])

    def prime_children(self) -> None:
        """List existing children before the first reconcile, so none is missed at startup."""
        self.rayjob_available = self.discover_rayjob()
        log.info("RayJob CRD %s", "found" if self.rayjob_available else "not installed")
        kinds = [(PYTORCHJOB_API_VERSION, PYTORCHJOB_PLURAL), (JOB_API_VERSION, "jobs")]
        if self.rayjob_available:
            kinds.append((RAYJOB_API_VERSION, RAYJOB_PLURAL))
        for api_version, plural in kinds:
            try:
                items = self.kube.list(api_version, plural, self.config.namespace, LABEL_JOB)
            except ApiException as error:
                if error.status == 404:
                    log.warning("%s/%s is not served: is its CRD installed?", api_version, plural)
                    continue
                raise
            for item in items:
                child = observe_child(item)
                if child is not None:
                    self.view.put_child(child)

    def resync(self) -> None:
        for key in self.view.job_keys():
            if self.view.state(key) not in FINISHED:
                self.queue.add(key)

    def requeue_all(self) -> None:
        for key in self.view.job_keys():
            self.queue.add(key)

    # -- workers

    def start(self) -> None:
        for index in range(self.config.workers):
            thread = threading.Thread(target=self._work, name=f"reconcile-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        ticker = threading.Thread(target=self._tick, name="resync", daemon=True)
        ticker.start()
        self._threads.append(ticker)

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()
        self._events.shutdown(wait=True, cancel_futures=False)

    def _tick(self) -> None:
        while not self._stop.wait(self.config.resync_seconds):
            self.metrics.queue_depth.set(len(self.queue))
            if self.is_leader():
                self.resync()

    def _work(self) -> None:
        while True:
            key = self.queue.get()
            if key is None:
                return
            try:
                if self.is_leader():
                    self.process(key)
            finally:
                self.queue.done(key)

    def process(self, key: Key) -> None:
        job = self.view.job(key)
        if job is None:
            return
        log.debug("reconciling %s/%s", *key)
        started = time.monotonic()
        try:
            decision = self.decide(job)
            self.apply(key, job, decision)
        except Conflict:
            self.metrics.reconciles.labels("conflict").inc()
            self._refresh(key)
            self.queue.add(key)
        except Exception as error:
            self.metrics.reconciles.labels("error").inc()
            self.metrics.reconcile_errors.labels(type(error).__name__).inc()
            delay = self.queue.add_rate_limited(key)
            log.warning(
                "reconcile of %s/%s failed (retry in %.1fs): %s",
                key[0],
                key[1],
                delay,
                error,
                exc_info=not isinstance(error, ApiException | OSError),
                extra={"job": f"{key[0]}/{key[1]}"},
            )
        else:
            self.metrics.reconciles.labels("ok").inc()
            self.queue.forget(key)
            if decision.requeue_after is not None:
                self.queue.add_after(key, decision.requeue_after + 0.05)
        finally:
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)

    def decide(self, job: dict[str, Any]) -> Decision:
        meta = job["metadata"]
        children = self.view.children((meta["namespace"], meta["name"]))
        observation = Observation()
        now = datetime.now(UTC)
        # Each answer adds one fact, and there are at most two per stage (checkpoint, progress);
        # a plan has at most 10 rounds x 16 co-trained models plus 6 other stages.
        for _ in range(2 * 170):
            decision = reconcile(
                job, children, observation, now, rayjob_available=self.rayjob_available
            )
            if not isinstance(decision, NeedStore):
                return decision
            observation = self._read(decision, observation)
        raise RuntimeError("reconcile kept asking for store facts")

    def _read(self, need: NeedStore, observation: Observation) -> Observation:
        assert need.s3 is not None
        if need.what == "checkpoint":
            return observation.with_checkpoint(
                need.stage, self.stores.final(need.s3, need.run, need.stage)
            )
        return observation.with_progress(
            need.stage, self.stores.progress(need.s3, need.run, need.stage)
        )

    def _refresh(self, key: Key) -> None:
        try:
            body = self.kube.get(job_ref(*key))
        except ApiException as error:
            if error.status == 404:
                self.view.drop_job(key)
                return
            raise
        self.view.put_job(body)

    def _post_event(self, job: dict[str, Any], event: Event) -> None:
        try:
            self.kube.event(job, event, self.identity)
        except Exception as error:  # an event is informative; never fail a reconcile over it
            log.warning("could not post event %s: %s", event.reason, error)

    def apply(self, key: Key, job: dict[str, Any], decision: Decision) -> None:
        meta = job["metadata"]
        for action in decision.actions:
            if isinstance(action, CreateObject):
                created = self.kube.create(action.body)
                child = observe_child(created) if created else None
                if child is not None:
                    self.view.put_child(child)
            elif isinstance(action, DeleteChild):
                self.kube.delete(action.child)
            elif isinstance(action, StopChild):
                patch = stop_patch(action.child.kind, action.reason)
                if action.resource_version:
                    patch["metadata"]["resourceVersion"] = action.resource_version
                try:
                    updated = self.kube.merge_patch(action.child, patch)
                except ApiException as error:
                    if error.status == 409:
                        raise Conflict() from error
                    if error.status != 404:
                        raise
                else:
                    child = observe_child(updated)
                    if child is not None:
                        self.view.put_child(child)
            elif isinstance(action, DeleteJob):
                log.info("deleting %s/%s: ttlSecondsAfterFinished passed", *key)
                self.kube.delete(job_ref(*key), uid=meta.get("uid"))
                return
        if decision.status is not None:
            patch = {
                "metadata": {"resourceVersion": meta.get("resourceVersion")},
                "status": merge_patch_for(job.get("status") or {}, decision.status),
            }
            try:
                updated = self.kube.merge_patch(job_ref(*key), patch, sub="status")
            except ApiException as error:
                if error.status == 409:
                    raise Conflict() from error
                if error.status == 404:
                    self.view.drop_job(key)
                    return
                raise
            with self._written_lock:
                self._written[key] = updated["metadata"]["resourceVersion"]
            if self.view.job(key) is not None:
                self.view.put_job(updated)
            for stage, seconds in decision.completed_stages:
                self.metrics.stage_seconds.labels(stage).observe(seconds)
            # Events follow the status they describe: no status change, no event (so a
            # decision repeated from a stale view does not announce the same thing twice).
            # Only what the event names, not the whole job, waits in the event queue.
            involved = {
                "metadata": {k: updated["metadata"].get(k) for k in ("name", "namespace", "uid")}
            }
            for event in decision.events:
                self._events.submit(self._post_event, involved, event)
        self.view.set_state(key, decision.state)


# ------------------------------------------------------------------------------------- kopf glue


def build_registry(controller: Controller, config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # our events are explicit, few, and counted
        settings.scanning.disabled = True  # no CRD watching: the resources are known
        settings.peering.standalone = True  # one actor at a time is the Lease's job
        settings.networking.request_timeout = 60
        settings.watching.label_selectors["kubeflow.org", PYTORCHJOB_PLURAL] = LABEL_JOB
        settings.watching.label_selectors["batch", "jobs"] = LABEL_JOB
        settings.watching.label_selectors["ray.io", RAYJOB_PLURAL] = LABEL_JOB
        controller.prime_children()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def job_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.job_event(event.get("type"), copy.deepcopy(dict(event["object"])))

    @kopf.on.event(
        "kubeflow.org", "v1", PYTORCHJOB_PLURAL, registry=registry, labels={LABEL_JOB: kopf.PRESENT}
    )
    async def pytorchjob_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.child_event(
            event.get("type"), _with_kind(event, "PyTorchJob", "kubeflow.org/v1")
        )

    @kopf.on.event("batch", "v1", "jobs", registry=registry, labels={LABEL_JOB: kopf.PRESENT})
    async def batch_job_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.child_event(event.get("type"), _with_kind(event, "Job", "batch/v1"))

    # Watched only where KubeRay's CRD is installed when the operator starts.
    @kopf.on.event(
        "ray.io", "v1", RAYJOB_PLURAL, registry=registry, labels={LABEL_JOB: kopf.PRESENT}
    )
    async def rayjob_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.child_event(
            event.get("type"), _with_kind(event, RAYJOB_KIND, RAYJOB_API_VERSION)
        )

    return registry


def _with_kind(event: Mapping[str, Any], kind: str, api_version: str) -> dict[str, Any]:
    body = copy.deepcopy(dict(event["object"]))
    body.setdefault("kind", kind)
    body.setdefault("apiVersion", api_version)
    return body


# ------------------------------------------------------------------------------------ logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the object it is about."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, Mapping) and ref.get("name"):
            entry["object"] = f"{ref.get('namespace', '')}/{ref['name']}".lstrip("/")
        for field in ("job", "stage", "child"):
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(log_format: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # kopf reports every watch event at debug level and each handler run at info: only its
    # warnings, unless everything is asked for.
    if root.level > logging.DEBUG:
        logging.getLogger("kopf").setLevel(max(logging.WARNING, root.level))


# ------------------------------------------------------------------------------------- running


def _bound_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each busy thread its own malloc arena (up to 8 per core); with a few dozen
    threads that multiplies the resident memory for nothing. Same as MALLOC_ARENA_MAX=2."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    with contextlib.suppress(OSError, AttributeError):
        m_arena_max = -8
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, arenas)


def _kube_client(workers: int) -> ApiClient:
    configuration = Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException:
        kube_config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = workers + 4
    client = ApiClient(configuration)
    client.user_agent = f"{COMPONENT}/{_version()}"
    return client


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ulmfit-operator")
    except PackageNotFoundError:
        return "dev"


def _own_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    with contextlib.suppress(OSError), open(path) as handle:
        return handle.read().strip()
    return os.environ.get("POD_NAMESPACE") or "default"


def default_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def run_operator(
    namespace: str | None = None,
    standalone: bool = False,
    metrics_port: int = 8000,
    health_port: int = 8080,
    *,
    metrics_address: str = "0.0.0.0",
    health_address: str = "0.0.0.0",
    resync_seconds: float = 30.0,
    workers: int = 16,
    lease_name: str = "ulmfit-operator",
    lease_namespace: str | None = None,
    lease_duration: float = 15.0,
    identity: str | None = None,
    log_format: str = "json",
    log_level: str = "INFO",
) -> None:
    """Run the controller until SIGTERM/SIGINT (what `ulmfit operator` and the Deployment run)."""
    _bound_malloc_arenas()
    setup_logging(log_format, log_level)
    config = OperatorConfig(
        namespace=namespace or None,
        standalone=standalone,
        metrics_port=metrics_port,
        metrics_address=metrics_address,
        health_port=health_port,
        health_address=health_address,
        resync_seconds=resync_seconds,
        workers=workers,
        lease_name=lease_name,
        lease_namespace=lease_namespace,
        lease_duration=lease_duration,
        renew_deadline=lease_duration * 2 / 3,
        retry_period=max(0.2, lease_duration / 7.5),
        identity=identity,
    )
    asyncio.run(_main(config))


async def _main(config: OperatorConfig) -> None:
    metrics = OperatorMetrics()
    metrics.serve(config.metrics_port, config.metrics_address)
    identity = config.identity or default_identity()
    kube = Kube(_kube_client(config.workers), metrics)
    controller = Controller(kube, StoreReader(metrics), metrics, config, identity)
    elector: LeaderElector | None = None
    if config.standalone:
        metrics.leader.set(1)
    else:

        def started() -> None:
            metrics.leader.set(1)
            controller.requeue_all()

        def lost() -> None:
            # Stop at once: anything this replica still did could race the new leader.
            metrics.leader.set(0)
            logging.shutdown()
            os._exit(1)

        elector = LeaderElector(
            kube,
            config.lease_namespace or config.namespace or _own_namespace(),
            config.lease_name,
            identity,
            config.lease_duration,
            config.renew_deadline,
            config.retry_period,
            started,
            lost,
        )
        controller.is_leader = elector.is_leader
        threading.Thread(target=elector.run, name="leader-election", daemon=True).start()
    controller.start()
    log.info(
        "operator %s starting (namespace=%s, standalone=%s, resync=%ss, workers=%d)",
        identity,
        config.namespace or "*",
        config.standalone,
        config.resync_seconds,
        config.workers,
    )
    try:
        await kopf.operator(
            registry=build_registry(controller, config),
            # Without one kopf asks getpass for a user name, which fails for an image's numeric
            # non-root user that has no passwd entry (ours: 65532). kopf types it as a NewType
            # of str that it does not export.
            identity=identity,  # type: ignore[arg-type]
            standalone=True,
            clusterwide=config.namespace is None,
            namespaces=[config.namespace] if config.namespace else (),
            liveness_endpoint=f"http://{config.health_address}:{config.health_port}/healthz",
        )
    finally:
        controller.stop()
        if elector is not None:
            elector.stop(release=True)
        log.info("operator %s stopped", identity)
