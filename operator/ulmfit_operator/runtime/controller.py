"""`Controller`: worker threads that read, decide and apply, one job at a time.

Watch events only update the `View` and queue the job (no I/O on kopf's loop). A worker takes a
job off the `WorkQueue`, reads what `reconcile.reconcile` asks for from the store, and applies
its decision: create/stop/delete children, one status patch (with the resourceVersion read, so a
stale view cannot overwrite a newer status), then events. A resync tick re-queues every
unfinished job so store-side progress is seen without any Kubernetes event. Reconcile gets the
settings' `JobPolicy`, so a job naming an S3 endpoint or trainer image they do not allow fails
before the store is read or a child is created. Only the leader (`is_leader`) reconciles; a
standby keeps its view warm.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from ulmfit_operator.children import (
    JOB_API_VERSION,
    LABEL_JOB,
    PYTORCHJOB_API_VERSION,
    PYTORCHJOB_PLURAL,
    RAYJOB_API_VERSION,
    RAYJOB_PLURAL,
    observe_child,
    stop_patch,
)
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.reconcile import (
    CreateObject,
    Decision,
    DeleteChild,
    DeleteJob,
    Event,
    NeedStore,
    Observation,
    StopChild,
    reconcile,
)
from ulmfit_operator.runtime.cache import Key, View
from ulmfit_operator.runtime.kube import Kube, job_ref, merge_patch_for
from ulmfit_operator.runtime.queue import WorkQueue
from ulmfit_operator.runtime.stores import StoreReader
from ulmfit_operator.settings import OperatorSettings

log = logging.getLogger("ulmfit_operator")

FINISHED = frozenset({"Succeeded", "Failed"})


class Conflict(Exception):
    """The job changed since it was read; read it again and decide again."""


class Controller:
    """The view, the queue and the workers of one operator process (see the module docstring)."""

    def __init__(
        self,
        kube: Kube,
        stores: StoreReader,
        metrics: OperatorMetrics,
        settings: OperatorSettings,
        identity: str,
    ):
        self.kube = kube
        self.stores = stores
        self.metrics = metrics
        self.settings = settings
        self.identity = identity
        self.policy = settings.job_policy()
        """The S3 endpoints and trainer images a job may name (reconcile refuses others)."""
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
                items = self.kube.list(api_version, plural, self.settings.namespace, LABEL_JOB)
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
        for index in range(self.settings.workers):
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
        while not self._stop.wait(self.settings.resync_seconds):
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
                job,
                children,
                observation,
                now,
                rayjob_available=self.rayjob_available,
                policy=self.policy,
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
