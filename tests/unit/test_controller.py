"""The controller's runtime around reconcile: what a job's status and events say while its store
cannot be read, and a replica that stops leading writes nothing more.

The API server and the store are stand-ins here (tests/integration/test_operator_outages.py runs
the same against a real API server and a real S3 server that is stopped and started).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from ulmfit_operator.children import OPTIONAL_KINDS, ChildRef
from ulmfit_operator.metrics import OperatorMetrics
from ulmfit_operator.reconcile import Event, FinalCheckpoint
from ulmfit_operator.runtime.controller import Controller
from ulmfit_operator.settings import OperatorSettings
from ulmfit_operator.status import format_time
from ulmfit_trainer.config import S3Settings
from ulmfit_trainer.records import StageProgress
from ulmfit_trainer.store.errors import StoreAuthError, StoreUnavailable

from tests.unit.test_reconcile import S3, job

pytestmark = pytest.mark.timeout(60)

KEY = ("team", "topics")
DOWN = StoreUnavailable(
    "S3 endpoint 127.0.0.1:9000 unavailable: list of s3://ulmfit-test/runs failed 2 times over "
    "0.2s; last error: MaxRetryError: Connection refused"
)


def _merged(old: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies a merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(old) if isinstance(old, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merged(result.get(key), value)
    return result


class FakeKube:
    """The API server's part: the one job's status patches, children created, events."""

    def __init__(self, body: dict[str, Any]):
        self.job = copy.deepcopy(body)
        self.status_patches: list[dict[str, Any]] = []
        self.created: list[Mapping[str, Any]] = []
        self.events: list[Event] = []

    def store_events(self) -> list[Event]:
        return [e for e in self.events if e.reason.startswith("Store")]

    def children(self) -> list[str]:
        """Names of the children (PyTorchJobs, Jobs) created."""
        return [b["metadata"]["name"] for b in self.created if b["kind"] in ("PyTorchJob", "Job")]

    def merge_patch(
        self, ref: ChildRef, patch: Mapping[str, Any], sub: str | None = None
    ) -> dict[str, Any]:
        assert (ref.kind, ref.name, sub) == ("ULMFiTJob", KEY[1], "status")
        assert patch["metadata"]["resourceVersion"] == self.job["metadata"]["resourceVersion"]
        self.status_patches.append(copy.deepcopy(dict(patch)))
        self.job["status"] = _merged(self.job.get("status") or {}, patch["status"])
        self.job["metadata"]["resourceVersion"] = str(
            int(self.job["metadata"]["resourceVersion"]) + 1
        )
        return copy.deepcopy(self.job)

    def create(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        self.created.append(body)
        made = copy.deepcopy(dict(body))
        # Made now: the controller decides on the real clock (a child made at the fixed NOW
        # would have passed its pending deadline long ago).
        made["metadata"].update(
            resourceVersion="1", creationTimestamp=format_time(datetime.now(UTC))
        )
        return made

    def event(self, involved: Mapping[str, Any], event: Event, instance: str) -> None:
        self.events.append(event)


class FakeStores:
    """The store reader: answers nothing is there yet, or fails with `error`."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.reads = 0

    def final(self, s3: S3Settings, run: str, stage: str) -> FinalCheckpoint | None:
        return self._answer()

    def progress(self, s3: S3Settings, run: str, stage: str) -> StageProgress | None:
        return self._answer()

    def _answer(self) -> None:
        self.reads += 1
        if self.error is not None:
            raise self.error


class Rig:
    def __init__(self) -> None:
        self.kube = FakeKube(job())
        self.stores = FakeStores()
        self.metrics = OperatorMetrics()
        self.controller = Controller(
            self.kube,  # type: ignore[arg-type]
            self.stores,  # type: ignore[arg-type]
            self.metrics,
            OperatorSettings(),
            "test-operator",
        )
        self.controller.view.put_job(copy.deepcopy(self.kube.job))

    def process(self) -> None:
        self.controller.process(KEY)
        self.controller._events.shutdown(wait=True)  # posted: look at them
        self.controller._events = type(self.controller._events)(1)

    def condition(self) -> dict[str, Any] | None:
        conditions = (self.kube.job.get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "StoreReachable"), None)

    def errors(self, kind: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "ulmfit_reconcile_errors_total", {"error": kind}
        )
        return value or 0.0

    def close(self) -> None:
        self.controller.stop()


@pytest.fixture
def rig() -> Any:
    made = Rig()
    yield made
    made.close()


def test_controller_store_outage_is_said_once_on_the_status_and_in_a_warning(rig: Rig) -> None:
    rig.process()  # reads fine: no outage, no condition; the first child is made
    assert rig.condition() is None
    assert rig.kube.children() == ["topics-finetune-a1"]
    created, patches = len(rig.kube.created), len(rig.kube.status_patches)

    rig.stores.error = DOWN
    rig.process()
    down = rig.condition()
    assert down is not None
    assert (down["status"], down["reason"]) == ("False", "StoreUnavailable")
    assert down["message"].startswith(
        f"cannot read the job's store (S3 endpoint {S3['endpoint']}, bucket 'ulmfit-test'): "
        "S3 endpoint 127.0.0.1:9000 unavailable: "
    )
    assert "Running stages are left running" in down["message"]
    assert down["observedGeneration"] == 1 and down["lastTransitionTime"]
    # Only the conditions were written: the rest of the status (stages, Running) stays.
    assert list(rig.kube.status_patches[-1]["status"]) == ["conditions"]
    status = rig.kube.job["status"]
    assert [c["type"] for c in status["conditions"]] == ["Running", "StoreReachable"]
    assert status["stages"] and status["progress"]
    assert rig.kube.store_events() == [Event("Warning", "StoreUnavailable", down["message"])]
    assert len(rig.kube.created) == created and rig.errors("StoreUnavailable") == 1

    for _ in range(3):  # retries while it lasts: nothing more is written or posted
        rig.process()
    assert len(rig.kube.status_patches) == patches + 1
    assert len(rig.kube.store_events()) == 1 and rig.condition() == down
    assert rig.errors("StoreUnavailable") == 4

    rig.stores.error = None
    rig.process()
    up = rig.condition()
    assert up is not None
    assert (up["status"], up["reason"]) == ("True", "StoreReadable")
    assert up["message"] == (
        f"the job's store (S3 endpoint {S3['endpoint']}, bucket 'ulmfit-test') can be read again "
        f"(it could not since {down['lastTransitionTime']}: StoreUnavailable)"
    )
    assert rig.kube.store_events()[-1] == Event("Normal", "StoreReadable", up["message"])
    assert not any(c["type"] == "Failed" for c in rig.kube.job["status"]["conditions"])

    rig.process()  # stays True, said once
    assert len(rig.kube.store_events()) == 2 and rig.condition() == up

    rig.stores.error = DOWN  # the next outage is said again
    rig.process()
    again = rig.condition()
    assert again is not None and again["status"] == "False"
    assert [e.reason for e in rig.kube.store_events()] == [
        "StoreUnavailable",
        "StoreReadable",
        "StoreUnavailable",
    ]


def test_controller_store_refusing_the_operators_keys_is_said_as_such(rig: Rig) -> None:
    rig.stores.error = DOWN
    rig.process()
    rig.stores.error = StoreAuthError("S3 endpoint 127.0.0.1:9000 refused list (AccessDenied)")
    rig.process()  # another reason: said again
    refused = rig.condition()
    assert refused is not None
    assert (refused["status"], refused["reason"]) == ("False", "StoreAccessDenied")
    assert "AccessDenied" in refused["message"]
    assert [e.reason for e in rig.kube.store_events()] == [
        "StoreUnavailable",
        "StoreAccessDenied",
    ]
    assert rig.errors("StoreAuthError") == 1  # by what the store raised


def test_controller_store_outage_report_is_best_effort(rig: Rig) -> None:
    def refuse(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise OSError("connection refused")  # the API server is away too

    rig.kube.merge_patch = refuse  # type: ignore[method-assign]
    rig.stores.error = DOWN
    rig.process()  # logged and retried, nothing raised
    assert rig.kube.store_events() == [] and rig.errors("StoreUnavailable") == 1
    assert len(rig.controller.queue._delayed) == 1  # retried with backoff


def test_controller_job_that_never_saw_an_outage_has_no_store_condition(rig: Rig) -> None:
    for _ in range(3):
        rig.process()
    assert rig.kube.children() == ["topics-finetune-a1"] and rig.stores.reads >= 3
    assert rig.condition() is None


def test_controller_that_stopped_leading_writes_nothing(rig: Rig) -> None:
    rig.controller.is_leader = lambda: False
    rig.process()  # decided (a first child), but not leading: nothing is written
    assert rig.kube.created == [] and rig.kube.status_patches == []
    assert len(rig.controller.queue._delayed) == 0  # the leader, once leading, looks again
    rig.stores.error = DOWN
    rig.process()  # nor is an outage reported
    assert rig.kube.status_patches == [] and rig.kube.events == []

    rig.stores.error = None
    rig.controller.is_leader = lambda: True
    rig.process()
    assert rig.kube.children() == ["topics-finetune-a1"] and len(rig.kube.status_patches) == 1


class DiscoveryKube:
    """The API server's discovery documents, for the kinds in `served` (kind -> plural)."""

    def __init__(self, served: dict[str, str]):
        self.served = served
        self.asked = 0

    def request(self, method: str, path: str, *_: Any, **__: Any) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        self.asked += 1
        group_version = path.removeprefix("/apis/")
        resources = [
            {"name": plural}
            for kind, plural in self.served.items()
            if OPTIONAL_KINDS[kind][0] == group_version
        ]
        if not resources:
            raise ApiException(status=404, reason="Not Found")
        return {"resources": resources}


def test_controller_discovers_the_served_workload_apis_and_uses_only_what_it_watches() -> None:
    """At start-up the operator finds which of TrainJob, PyTorchJob and RayJob are served and
    watches those; when it takes the lead again it looks once more: a kind uninstalled since is
    no longer used, and one installed since is not used before a restart (nothing watches it)."""
    kube = DiscoveryKube({"TrainJob": "trainjobs", "PyTorchJob": "pytorchjobs"})
    controller = Controller(
        kube,  # type: ignore[arg-type]
        FakeStores(),  # type: ignore[arg-type]
        OperatorMetrics(),
        OperatorSettings(training_backend="pytorchjob", training_runtime="team-torch"),
        "test-operator",
    )
    controller.discover()
    cluster = controller.cluster
    assert (cluster.trainjob, cluster.pytorchjob, cluster.rayjob) == (True, True, False)
    assert (cluster.training_backend, cluster.training_runtime) == ("pytorchjob", "team-torch")
    assert kube.asked == 3  # once per kind; reconciles never ask

    kube.served = {"PyTorchJob": "pytorchjobs", "RayJob": "rayjobs"}
    controller.discover()
    cluster = controller.cluster
    assert (cluster.trainjob, cluster.pytorchjob, cluster.rayjob) == (False, True, False)
