"""`LeaderElector`: only one replica acts, the one holding a `coordination.k8s.io` Lease.

After client-go's leader election. Standbys keep watching (warm caches) but do not reconcile; a
leader that cannot renew stops leading at the renew deadline (its workers check before each
write) and goes on as a candidate: it takes the lease back at once when nobody else took it (the
API server was away), else it stands by. Restarting with the same identity (a container restart
in the same pod) takes the lease back at once too. Deterministic child
names make even an overlap harmless: a second create is a 409.

`default_identity` and `own_namespace` are where a replica's name in the Lease and the Lease's
default namespace come from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from ulmfit_operator.children import ChildRef
from ulmfit_operator.runtime.kube import Kube, resource_path

log = logging.getLogger("ulmfit_operator")


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
        path = resource_path(self.ref.api_version, "leases", self.ref.namespace, self.ref.name)
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


def own_namespace() -> str:
    """The namespace this pod runs in (its ServiceAccount's), else POD_NAMESPACE, else default."""
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    with contextlib.suppress(OSError), open(path) as handle:
        return handle.read().strip()
    return os.environ.get("POD_NAMESPACE") or "default"


def default_identity() -> str:
    """This replica's name in the Lease: the pod name, else the host name and a random suffix."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
