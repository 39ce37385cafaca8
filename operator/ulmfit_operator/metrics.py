"""Prometheus metrics of the operator, served on `/metrics`.

Its own registry (not the process-global one), so two operators in one test process do not
collide; it still carries the process collector (`process_resident_memory_bytes`, CPU, fds).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ulmfit_operator.decisions import StageGauges

JOB_STATES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")


class _JobsByState(Collector):
    """`ulmfit_jobs{state}`, counted at scrape time from the operator's own view."""

    def __init__(self, source: Callable[[], Mapping[str, int]]):
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ulmfit_jobs", "ULMFiTJobs the operator sees, by state.", labels=["state"]
        )
        counts = dict.fromkeys(JOB_STATES, 0)
        counts.update(self._source())
        for state, count in sorted(counts.items()):
            family.add_metric([state], count)
        yield family


class JobGauges:
    """Per job and ready stage: progress, loss, throughput, attempts, time queued.

    Series exist only for the stages that are ready now (one, or the co-trained models of a
    round), and go when the stage finishes, the job ends or the job is deleted, so the label
    sets stay as many as the stages running at once."""

    def __init__(self, registry: CollectorRegistry):
        labels = ["namespace", "job", "stage"]
        self._gauges = {
            "progress": Gauge(
                "ulmfit_stage_progress_ratio",
                "Share of a running stage's steps done (0 to 1).",
                labels,
                registry=registry,
            ),
            "loss": Gauge(
                "ulmfit_stage_loss",
                "A running stage's mean training loss at its last report.",
                labels,
                registry=registry,
            ),
            "tokens_per_second": Gauge(
                "ulmfit_stage_tokens_per_second",
                "A running stage's training throughput at its last report, all ranks.",
                labels,
                registry=registry,
            ),
            "attempts": Gauge(
                "ulmfit_stage_attempts",
                "The number of a ready stage's current attempt.",
                labels,
                registry=registry,
            ),
            "queued_seconds": Gauge(
                "ulmfit_stage_queued_seconds",
                "How long a stage's attempt has waited for its queue to admit it.",
                labels,
                registry=registry,
            ),
        }
        self._series: dict[tuple[str, str], dict[str, set[str]]] = {}
        """(namespace, job) -> stage -> the gauges it has a series in."""
        self._lock = threading.Lock()

    def update(self, namespace: str, job: str, stages: Sequence[StageGauges]) -> None:
        """Set the job's series to exactly these stages' numbers."""
        with self._lock:
            before = self._series.pop((namespace, job), {})
            now: dict[str, set[str]] = {}
            for stage in stages:
                values = {
                    "progress": stage.progress,
                    "loss": stage.loss,
                    "tokens_per_second": stage.tokens_per_second,
                    "attempts": float(stage.attempts),
                    "queued_seconds": stage.queued_seconds,
                }
                kept = {name for name, value in values.items() if value is not None}
                for name in kept:
                    value = values[name]
                    assert value is not None
                    self._gauges[name].labels(namespace, job, stage.stage).set(value)
                now[stage.stage] = kept
            for name_of_stage, names in before.items():
                for name in names - now.get(name_of_stage, set()):
                    self._gauges[name].remove(namespace, job, name_of_stage)
            if now:
                self._series[(namespace, job)] = now

    def drop(self, namespace: str, job: str) -> None:
        self.update(namespace, job, ())


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.reconciles = Counter(
            "ulmfit_reconciles_total",
            "Reconciles of a ULMFiTJob, by result.",
            ["result"],
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "ulmfit_reconcile_errors_total",
            "Reconciles that failed and were retried, by error type.",
            ["error"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "ulmfit_reconcile_duration_seconds",
            "Time of one reconcile, store reads and API writes included.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "ulmfit_stage_duration_seconds",
            "Wall time of a stage, from its first attempt to its final checkpoint, by stage kind "
            "(all co-trained models count as `cotrain`).",
            ["stage"],
            buckets=(10, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400),
            registry=self.registry,
        )
        self.api_writes = Counter(
            "ulmfit_api_writes_total",
            "Writes the operator sent to the Kubernetes API, by verb and resource.",
            ["verb", "resource"],
            registry=self.registry,
        )
        self.store_reads = Counter(
            "ulmfit_store_reads_total", "Store lookups, by kind.", ["what"], registry=self.registry
        )
        self.leader = Gauge(
            "ulmfit_leader", "1 while this replica holds the leader lease.", registry=self.registry
        )
        self.queue_depth = Gauge(
            "ulmfit_workqueue_depth", "Jobs waiting for a reconcile.", registry=self.registry
        )
        self.jobs = JobGauges(self.registry)
        self._jobs_source: Callable[[], Mapping[str, int]] = dict
        self.registry.register(_JobsByState(lambda: self._jobs_source()))

    def count_jobs_with(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._jobs_source = source

    def serve(self, port: int, address: str) -> Any:
        """Start the `/metrics` HTTP server in a daemon thread."""
        return start_http_server(port, addr=address, registry=self.registry)
