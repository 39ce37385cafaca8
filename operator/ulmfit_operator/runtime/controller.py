"""`Controller`: worker threads that read, decide and apply, one job at a time.

Watch events only update the `View` and queue the job (no I/O on kopf's loop). A worker takes a
job off the `WorkQueue`, reads what `reconcile.reconcile` asks for from the store, and applies
its decision: create/stop/delete children, one status patch (with the resourceVersion read, so a
stale view cannot overwrite a newer status), then events. A resync tick re-queues every
unfinished job so store-side progress is seen without any Kubernetes event (in the queue's resync
lane: what a watch event queued is handed out first). Reconcile gets the
settings' `JobPolicy`, so a job naming an S3 endpoint or trainer image they do not allow fails
before the store is read or a child is created. Only the leader (`is_leader`) reconciles, and a
worker checks again before each write (a leader that could not renew stops writing at once); a
standby keeps its view warm.

When the store cannot be read, reconcile cannot decide, so nothing is done to the job's children
(they keep running) and the job is retried with backoff; the job's status says so, once per
outage: the `StoreReachable` condition turns False (reason `StoreUnavailable`, or
`StoreAccessDenied` / `StoreError` for a store that answers but refuses) with a Warning event,
and the first reconcile that reads the store again turns it True (`StoreReadable`) with a Normal
event. A job that never saw an outage has no such condition.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException
from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.store.errors import StoreAuthError, StoreError, StoreUnavailable

from ulmfit_operator.children import (
    JOB_API_VERSION,
    LABEL_JOB,
    OPTIONAL_KINDS,
    PYTORCHJOB_KIND,
    RAYJOB_KIND,
    TRAINJOB_KIND,
    Cluster,
    observe_child,
    stop_patch,
)
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.observations import pod_report
from ulmfit_operator.reconcile import (
    CreateObject,
    Decision,
    DeleteChild,
    DeleteJob,
    Event,
    NeedPods,
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
from ulmfit_operator.status import (
    Condition,
    ConditionType,
    find_condition,
    format_time,
    read_status,
    set_condition,
)

log = logging.getLogger("ulmfit_operator")

FINISHED = frozenset({"Succeeded", "Failed"})


class Conflict(Exception):
    """The job changed since it was read; read it again and decide again."""


class NotLeading(Exception):
    """This replica stopped leading in the middle of a reconcile: it writes nothing more (the
    leader, this replica again once it has the lease back, reconciles the job afresh)."""


STORE_READABLE = "StoreReadable"
"""The reason of `StoreReachable=True`: a read succeeded after the store could not be read."""


class StoreUnreadable(Exception):
    """A store fact reconcile asked for could not be read: nothing can be decided for the job
    until it can (its children are left as they are); its status says why."""

    def __init__(self, s3: S3Settings, error: Exception):
        super().__init__(str(error))
        self.s3 = s3
        self.error = error

    @property
    def reason(self) -> str:
        """`StoreUnavailable` (not reached: connection errors, timeouts, 5xx), `StoreAccessDenied`
        (the operator's credentials refused) or `StoreError` (any other refusal)."""
        if isinstance(self.error, StoreUnavailable | OSError):
            return "StoreUnavailable"
        if isinstance(self.error, StoreAuthError):
            return "StoreAccessDenied"
        return "StoreError"

    @property
    def message(self) -> str:
        return (
            f"cannot read the job's store (S3 endpoint {self.s3.endpoint}, bucket "
            f"{self.s3.bucket!r}): {self.error}. Running stages are left running and nothing is "
            "deleted; the operator retries and goes on once the store can be read"
        )


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
        self._patching: dict[Key, list[str | None]] = {}
        """Jobs whose status patch is in flight -> the resourceVersions their watch events
        brought meanwhile (which may be that patch's own: decided once it returns)."""
        self._written_lock = threading.Lock()
        self.is_leader: Callable[[], bool] = lambda: True
        self.cluster = Cluster(
            training_backend=settings.training_backend,
            training_runtime=settings.training_runtime,
        )
        """The workload APIs served, found at start-up (kopf watches what it finds then, so a
        Kubeflow Trainer or KubeRay installed later is used after a restart) and checked again
        when this replica takes the lead (one uninstalled since is no longer used)."""
        self._watched: frozenset[str] = frozenset()
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
            self.metrics.jobs.drop(*key)
            with self._written_lock:
                self._written.pop(key, None)
            return
        self.view.put_job(body)
        version = meta.get("resourceVersion")
        with self._written_lock:
            seen = self._patching.get(key)
            if seen is not None:  # our patch's own event may beat its answer: wait for it
                seen.append(version)
                return
            ours = self._written.get(key) == version
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

    def served(self, api_version: str, plural: str) -> bool:
        """Whether the API serves `plural` (discovery: every authenticated client may read it)."""
        try:
            found = self.kube.request("GET", f"/apis/{api_version}")
        except ApiException as error:
            if error.status in (403, 404):
                return False
            raise
        return any(r.get("name") == plural for r in (found or {}).get("resources") or [])

    def discover(self) -> None:
        """Which workload APIs the cluster serves, now: at start-up, and again when this replica
        takes the lead (never per reconcile). Only kinds found at start-up are watched, so only
        those can be used until a restart."""
        found = {
            kind: self.served(api_version, plural)
            for kind, (api_version, plural) in OPTIONAL_KINDS.items()
        }
        if not self._watched:
            self._watched = frozenset(kind for kind, served in found.items() if served)
        usable = {kind: served and kind in self._watched for kind, served in found.items()}
        self.cluster = dataclasses.replace(
            self.cluster,
            trainjob=usable[TRAINJOB_KIND],
            pytorchjob=usable[PYTORCHJOB_KIND],
            rayjob=usable[RAYJOB_KIND],
        )
        log.info(
            "workload APIs: %s; training backend %s",
            ", ".join(f"{kind} {'served' if usable[kind] else 'absent'}" for kind in usable),
            self.settings.training_backend.value,
        )

    def prime_children(self) -> None:
        """List existing children before the first reconcile, so none is missed at startup."""
        self.discover()
        kinds = [(JOB_API_VERSION, "jobs")] + [
            OPTIONAL_KINDS[kind] for kind in sorted(self._watched)
        ]
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
        # The resync lane: keys a watch event adds (new jobs, children that changed) go first.
        for key in self.view.job_keys():
            if self.view.state(key) not in FINISHED:
                self.queue.add(key, resync=True)

    def requeue_all(self) -> None:
        for key in self.view.job_keys():
            self.queue.add(key, resync=True)

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
        except NotLeading:
            log.info("stopped reconciling %s/%s: not leading", *key)
        except StoreUnreadable as error:
            self.metrics.reconciles.labels("error").inc()
            # Labelled by what the store raised, as any other failed reconcile is.
            self.metrics.reconcile_errors.labels(type(error.error).__name__).inc()
            delay = self.queue.add_rate_limited(key)
            log.warning(
                "reconcile of %s/%s waits for its store (retry in %.1fs): %s",
                key[0],
                key[1],
                delay,
                error,
                extra={"job": f"{key[0]}/{key[1]}"},
            )
            self._report_unreadable(key, job, error)
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
        read: S3Settings | None = None
        # Each answer adds one fact, and there are at most two per stage (checkpoint, progress);
        # a plan has at most 10 rounds x 16 co-trained models plus 6 other stages.
        for _ in range(2 * 170):
            decision = reconcile(
                job,
                children,
                observation,
                now,
                cluster=self.cluster,
                policy=self.policy,
            )
            if isinstance(decision, NeedPods):
                observation = observation.with_pods(decision.child, self._pod_report(decision))
                continue
            if not isinstance(decision, NeedStore):
                return decision if read is None else _store_readable(job, decision, read, now)
            observation = self._read(decision, observation)
            read = decision.s3
        raise RuntimeError("reconcile kept asking for store facts")

    def _pod_report(self, need: NeedPods) -> str:
        """Why a child's pods have not started (asked for only once its pending deadline has
        passed, so pods need no watch of their own)."""
        pods = self.kube.list("v1", "pods", need.namespace, need.selector)
        return pod_report(pods)

    def _read(self, need: NeedStore, observation: Observation) -> Observation:
        assert need.s3 is not None
        try:
            if need.what == "checkpoint":
                return observation.with_checkpoint(
                    need.stage, self.stores.final(need.s3, need.run, need.stage)
                )
            return observation.with_progress(
                need.stage, self.stores.progress(need.s3, need.run, need.stage)
            )
        except (StoreError, OSError) as error:  # a missing object is an answer, not an error
            raise StoreUnreadable(need.s3, error) from error

    def _report_unreadable(self, key: Key, job: dict[str, Any], error: StoreUnreadable) -> None:
        """`StoreReachable=False` on the job's status and a Warning event, once per outage (and
        again only when the reason changes); best effort: the API server may be down too."""
        meta = job["metadata"]
        status = read_status(job.get("status"))
        previous = find_condition(status.conditions, ConditionType.STORE_REACHABLE)
        if previous is not None and previous.status == "False" and previous.reason == error.reason:
            return
        condition = Condition(
            type=ConditionType.STORE_REACHABLE,
            status="False",
            reason=error.reason,
            message=error.message,
            last_transition_time=format_time(datetime.now(UTC)),
            observed_generation=meta.get("generation"),
        )
        conditions = set_condition(status.conditions, condition)
        patch = {
            "metadata": {"resourceVersion": meta.get("resourceVersion")},
            "status": {"conditions": [c.to_wire() for c in conditions]},
        }
        try:
            if not self.is_leader():
                return
            updated = self._patch_status(key, patch)
        except Exception as failure:  # a 409 or the API server down: the next retry says it
            log.warning("could not report the store outage on %s/%s: %s", *key, failure)
            return
        self._status_written(key, updated, [Event("Warning", error.reason, error.message)])

    def _patch_status(self, key: Key, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the job's status, remembering the resourceVersion it made: the watch
        event of our own write queues no second reconcile, whichever arrives first (the event
        or the answer); any other event seen meanwhile queues the job as usual."""
        with self._written_lock:
            self._patching[key] = []
        updated: dict[str, Any] | None = None
        try:
            updated = self.kube.merge_patch(job_ref(*key), patch, sub="status")
            return updated
        finally:
            version = updated["metadata"]["resourceVersion"] if updated is not None else None
            with self._written_lock:
                seen = self._patching.pop(key, [])
                if version is not None:
                    self._written[key] = version
            if any(other != version for other in seen):
                self.queue.add(key)

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

    def _leading(self) -> None:
        if not self.is_leader():
            raise NotLeading()

    def apply(self, key: Key, job: dict[str, Any], decision: Decision) -> None:
        meta = job["metadata"]
        for action in decision.actions:
            self._leading()
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
            self._leading()
            patch = {
                "metadata": {"resourceVersion": meta.get("resourceVersion")},
                "status": merge_patch_for(job.get("status") or {}, decision.status),
            }
            try:
                updated = self._patch_status(key, patch)
            except ApiException as error:
                if error.status == 409:
                    raise Conflict() from error
                if error.status == 404:
                    self.view.drop_job(key)
                    self.metrics.jobs.drop(*key)
                    return
                raise
            for stage, seconds in decision.completed_stages:
                self.metrics.stage_seconds.labels(stage).observe(seconds)
            # Events follow the status they describe: no status change, no event (so a
            # decision repeated from a stale view does not announce the same thing twice).
            self._status_written(key, updated, decision.events)
        self.view.set_state(key, decision.state)
        self.metrics.jobs.update(key[0], key[1], decision.gauges)

    def _status_written(self, key: Key, updated: dict[str, Any], events: Sequence[Event]) -> None:
        """After a status patch: the view gets the job as written, then the events are posted.
        Only what an event names, not the whole job, waits in the event queue."""
        if self.view.job(key) is not None:
            self.view.put_job(updated)
        involved = {
            "metadata": {k: updated["metadata"].get(k) for k in ("name", "namespace", "uid")}
        }
        for event in events:
            self._events.submit(self._post_event, involved, event)


def _store_readable(
    job: dict[str, Any], decision: Decision, s3: S3Settings, now: datetime
) -> Decision:
    """`decision`, with `StoreReachable` turned True (and a Normal event) when the job's status
    still says its store could not be read: this reconcile just read it."""
    old = read_status(job.get("status"))
    previous = find_condition(old.conditions, ConditionType.STORE_REACHABLE)
    if previous is None or previous.status == "True":
        return decision
    status = read_status(decision.status) if decision.status is not None else old
    message = (
        f"the job's store (S3 endpoint {s3.endpoint}, bucket {s3.bucket!r}) can be read again "
        f"(it could not since {previous.last_transition_time}: {previous.reason})"
    )
    condition = Condition(
        type=ConditionType.STORE_REACHABLE,
        status="True",
        reason=STORE_READABLE,
        message=message,
        last_transition_time=format_time(now),
        observed_generation=(job.get("metadata") or {}).get("generation"),
    )
    status.conditions = set_condition(status.conditions, condition)
    return dataclasses.replace(
        decision,
        status=status.to_wire(),
        events=(*decision.events, Event("Normal", STORE_READABLE, message)),
    )
