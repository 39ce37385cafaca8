"""kopf glue: the watches, and the start-up of one operator process.

kopf watches ULMFiTJobs and their children and keeps the operator alive (health endpoint,
reconnects); its event handlers only update the controller's in-memory view and queue the job
(`runtime.controller` does the rest, on its own threads). `run_operator` starts it all from
`OperatorSettings` (`settings`): metrics, the API client, leader election, the workers, kopf.

kopf timers would do the resync too, but kopf puts a finalizer on every object that has a timer
(one more write per job, and deleting a job waits for a running operator); one tick over the
in-memory view does the same with neither. kopf's own peering is off: one actor at a time is
the Lease's job (`runtime.leader`). A leader that cannot renew its Lease (the API server away)
stops acting but does not exit: it leads again once it holds the Lease again.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import kopf

from ulmfit_operator.api import GROUP, PLURAL, VERSION
from ulmfit_operator.children import (
    LABEL_JOB,
    PYTORCHJOB_PLURAL,
    RAYJOB_API_VERSION,
    RAYJOB_KIND,
    RAYJOB_PLURAL,
    TRAINJOB_API_VERSION,
    TRAINJOB_KIND,
    TRAINJOB_PLURAL,
)
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.policy import ANY
from ulmfit_operator.runtime.controller import Controller
from ulmfit_operator.runtime.kube import Kube, connect
from ulmfit_operator.runtime.leader import LeaderElector, default_identity, own_namespace
from ulmfit_operator.runtime.logs import setup_logging
from ulmfit_operator.runtime.stores import StoreReader
from ulmfit_operator.settings import OperatorSettings

log = logging.getLogger("ulmfit_operator")


def build_registry(controller: Controller) -> kopf.OperatorRegistry:
    """kopf's side: log in, configure, and turn watch events into the controller's calls."""
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
        settings.watching.label_selectors["trainer.kubeflow.org", TRAINJOB_PLURAL] = LABEL_JOB
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

    # These three are watched only where their CRD is installed when the operator starts.
    @kopf.on.event(
        "trainer.kubeflow.org",
        "v1alpha1",
        TRAINJOB_PLURAL,
        registry=registry,
        labels={LABEL_JOB: kopf.PRESENT},
    )
    async def trainjob_event(event: Mapping[str, Any], **_: Any) -> None:
        controller.child_event(
            event.get("type"), _with_kind(event, TRAINJOB_KIND, TRAINJOB_API_VERSION)
        )

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


# ------------------------------------------------------------------------------------- running


def _bound_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each busy thread its own malloc arena (up to 8 per core); with a few dozen
    threads that multiplies the resident memory for nothing. Same as MALLOC_ARENA_MAX=2."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    with contextlib.suppress(OSError, AttributeError):
        m_arena_max = -8
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, arenas)


def run_operator(settings: OperatorSettings) -> None:
    """Run the controller until SIGTERM/SIGINT (what `ulmfit operator` and the Deployment run)."""
    _bound_malloc_arenas()
    setup_logging(settings.log_format, settings.log_level)
    asyncio.run(_main(settings))


async def _main(settings: OperatorSettings) -> None:
    metrics = OperatorMetrics()
    metrics.serve(settings.metrics_port, settings.metrics_address)
    identity = settings.identity or default_identity()
    kube = Kube(connect(settings.workers + 4), metrics)
    stores = StoreReader(metrics, settings.job_policy())
    controller = Controller(kube, stores, metrics, settings, identity)
    elector: LeaderElector | None = None
    if settings.standalone:
        metrics.leader.set(1)
    else:

        def started() -> None:
            metrics.leader.set(1)
            # A CRD uninstalled while another replica led is no longer used.
            try:
                controller.discover()
            except Exception:  # the API away: keep what was found before, and lead anyway
                log.exception("could not check which workload APIs are served")
            controller.requeue_all()

        def lost() -> None:
            # The workers stopped already: `is_leader` turned False at the renew deadline, and
            # a worker checks it before each write. The process stays (warm view, watches):
            # the elector keeps trying, and takes the Lease back at once if nobody else did
            # (the API server was away), else this replica stands by.
            metrics.leader.set(0)
            log.warning("stopped reconciling until this replica holds the lease again")

        elector = LeaderElector(
            kube,
            settings.lease_namespace or settings.namespace or own_namespace(),
            settings.lease_name,
            identity,
            settings.lease_duration,
            settings.renew_deadline,
            settings.retry_period,
            started,
            lost,
        )
        controller.is_leader = elector.is_leader
        threading.Thread(target=elector.run, name="leader-election", daemon=True).start()
    controller.start()
    log.info(
        "operator %s starting (namespace=%s, standalone=%s, resync=%ss, workers=%d, "
        "S3 endpoints=%s, trainer images=%s)",
        identity,
        settings.namespace or "*",
        settings.standalone,
        settings.resync_seconds,
        settings.workers,
        ",".join(settings.allowed_s3_endpoints) or "none",
        ",".join(settings.allowed_trainer_images) or "none",
    )
    if ANY in settings.allowed_s3_endpoints:
        log.warning(
            "--allowed-s3-endpoints allows any endpoint: a job can make the operator send "
            "requests signed with its S3 keys to any host it names; list your stores instead"
        )
    try:
        await kopf.operator(
            registry=build_registry(controller),
            # Without one kopf asks getpass for a user name, which fails for an image's numeric
            # non-root user that has no passwd entry (ours: 65532). kopf types it as a NewType
            # of str that it does not export.
            identity=identity,  # type: ignore[arg-type]
            standalone=True,
            clusterwide=settings.namespace is None,
            namespaces=[settings.namespace] if settings.namespace else (),
            liveness_endpoint=f"http://{settings.health_address}:{settings.health_port}/healthz",
        )
    finally:
        controller.stop()
        if elector is not None:
            elector.stop(release=True)
        log.info("operator %s stopped", identity)
