"""The ULMFiTJob status: models (the one source of the CRD's status schema) and condition helpers.

The operator writes status; nobody else does. It is a cache of what the cluster (children) and
the store (checkpoints, progress) say, so every field here can be recomputed from those two.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError
from ulmfit_trainer.config import StageName, WireModel

from ulmfit_operator.api import StageState

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
"""An RFC 3339 time in UTC with second precision, as Kubernetes writes them."""


class ConditionType(StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    QUEUED = "Queued"
    """Whether a stage's attempt waits, suspended, for a queue (Kueue) to admit it."""
    STORE_REACHABLE = "StoreReachable"
    """Whether the operator could read the job's store (set by the runtime, only once a read
    failed: False while it cannot, True again once it can)."""


class Condition(WireModel):
    """One aspect of the job's state, as the Kubernetes API conventions describe conditions."""

    type: ConditionType
    """`Running`, `Succeeded`, `Failed`, `Suspended`, `Queued` or `StoreReachable`."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z][A-Za-z0-9]*$")]
    """A CamelCase word for programs: why the condition last changed (e.g. `InvalidSpec`)."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """A sentence for people: what happened."""
    last_transition_time: Timestamp
    """When `status` last flipped (not when the reason or message changed)."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """`metadata.generation` of the spec this condition was computed from."""


class LiveProgress(WireModel):
    """What a running attempt last reported (its `progress.json`), for people and dashboards."""

    step: Annotated[int, Field(ge=0)] = 0
    """Steps done in this stage (trials done, for a sweep)."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Steps the stage takes in all."""
    loss: float | None = None
    """Mean training loss since the report before."""
    tokens_per_second: float | None = None
    """Training throughput, all ranks together."""
    eta_seconds: Annotated[int, Field(ge=0)] | None = None
    """Seconds left at the pace between the last two reports the operator saw."""
    updated_at: Timestamp | None = None
    """When the trainer made the report."""


class StageStatus(WireModel):
    """What happened to one stage of the plan."""

    name: str
    """The stage's key: `pretrain`, `finetune`, `cotrain-<model>` (`cotrain-<model>-r<round>`
    after the first round), `tune`, `classifier` or `evaluate`."""
    kind: StageName | None = None
    """What the stage runs (`cotrain` for every co-trained model)."""
    state: StageState
    """`Pending`, `Running`, `Succeeded`, `Failed` or `Skipped`."""
    attempts: Annotated[int, Field(ge=0)] = 0
    """Number of the current (or last) attempt; each attempt is one child workload."""
    failures: Annotated[int, Field(ge=0)] = 0
    """Attempts that failed (counted against `runPolicy.backoffLimit`)."""
    child: str | None = None
    """Name of the current (or last) child workload (a PyTorchJob; a Job for `evaluate` and a
    pod-backed `tune`; a RayJob for a KubeRay-backed `tune`)."""
    start_time: Timestamp | None = None
    """When the stage's first attempt was created."""
    completion_time: Timestamp | None = None
    """When the stage's final checkpoint was committed."""
    checkpoint: str | None = None
    """URI of the stage's final checkpoint (what the next stage starts from)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Numeric metrics the stage recorded with its final checkpoint."""
    message: str | None = None
    """Why the last attempt failed, when it did; or why the current one waits."""
    last_error: str | None = None
    """The error line the trainer reported when its last attempt failed (`Type: message`)."""
    progress: LiveProgress | None = None
    """The running attempt's last report (step, loss, throughput, ETA)."""
    queued_since: Timestamp | None = None
    """Since when the current attempt waits for a queue to admit it."""


class PseudoLabelStats(WireModel):
    """The co-trained pseudo-labels the final classifier trained on."""

    total: Annotated[int, Field(ge=0)] = 0
    """Pseudo-labeled documents added to the training set."""
    per_class: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    """Pseudo-labels per label."""
    accuracy: float | None = None
    """Share of pseudo-labels matching the true label, where the pool has true labels."""
    weak_label_accuracy: float | None = None
    """Share of weak (rule or noisy) labels matching the true label, where known."""


class JobResult(WireModel):
    """What the job produced."""

    model_uri: str | None = None
    """Where the exported model (Hugging Face `save_pretrained` layout) lives."""
    test_metrics: dict[str, float] = Field(default_factory=dict)
    """Metrics on the test split: accuracy, macro-F1, the majority-class baseline, ..."""
    best_params: dict[str, float] | None = None
    """The tune stage's best classifier hyperparameters (wire names), which the final
    classifier trained with."""
    pseudo_labels: PseudoLabelStats | None = None
    """Pseudo-label statistics of the final classifier's training set (co-training only)."""


class TuneStatus(WireModel):
    """Where to watch the hyperparameter sweep."""

    backend: Literal["pod", "rayjob"]
    """What runs the sweep: one pod with a Ray head (`pod`) or a KubeRay RayJob (`rayjob`)."""
    service: str
    """The ClusterIP Service in front of the Ray dashboard (port 8265)."""
    dashboard: str
    """The Ray dashboard's address: inside the cluster (`rayjob`), or `http://localhost:8265`
    once the port-forward runs (`pod`: its dashboard listens on the pod's loopback only)."""
    port_forward: str
    """Run this to open the dashboard at http://localhost:8265."""
    best_params: dict[str, float] | None = None
    """The best trial's hyperparameters, once the sweep has finished."""


class ULMFiTJobStatus(WireModel):
    """Observed state of a ULMFiTJob, written by the operator."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """`metadata.generation` of the spec the operator last acted on."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Summary conditions: `Running`, `Succeeded`, `Failed`, `Suspended`, `Queued` (an attempt
    waits for its queue); `StoreReachable` once
    the operator could not read the job's store (False while it cannot, True once it can)."""
    stages: list[StageStatus] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """One entry per planned stage, in plan order."""
    current_stage: str | None = None
    """The stages that run now (or ran last), comma-separated: co-trained models run at once."""
    progress: str | None = None
    """Progress for people, e.g. `classifier phase 2/4, 63%`."""
    eta: str | None = None
    """Time left in the running stages at their current pace, e.g. `12m30s` (unknown: absent)."""
    start_time: Timestamp | None = None
    """When the operator started the job (reset when a suspended job resumes)."""
    completion_time: Timestamp | None = None
    """When the job succeeded or failed."""
    tune: TuneStatus | None = None
    """The hyperparameter sweep's dashboard, once the tune stage has started."""
    result: JobResult | None = None
    """The exported model and its test metrics, once the job has succeeded."""


# ------------------------------------------------------------------------------------ helpers


def format_time(moment: datetime) -> str:
    """RFC 3339, UTC, whole seconds: `2024-05-01T12:00:00Z`."""
    return moment.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    """The inverse of `format_time`; tolerant of fractions and offsets. None for junk."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def read_status(raw: Any) -> ULMFiTJobStatus:
    """The status as the cluster holds it; an unreadable one counts as empty (it is a cache)."""
    if not isinstance(raw, dict):
        return ULMFiTJobStatus()
    try:
        return ULMFiTJobStatus.model_validate(raw)
    except ValidationError:
        return ULMFiTJobStatus()


def find_condition(conditions: list[Condition], kind: ConditionType) -> Condition | None:
    return next((c for c in conditions if c.type == kind), None)


def condition_true(conditions: list[Condition], kind: ConditionType) -> bool:
    found = find_condition(conditions, kind)
    return found is not None and found.status == "True"


def set_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    """A new list with `new` in place of the condition of its type. `lastTransitionTime` moves
    only when the status flips: otherwise the old condition's time is kept."""
    previous = find_condition(conditions, new.type)
    if previous is not None and previous.status == new.status:
        new = new.model_copy(update={"last_transition_time": previous.last_transition_time})
    result = [c for c in conditions if c.type != new.type]
    result.append(new)
    order = list(ConditionType)
    return sorted(result, key=lambda c: order.index(c.type))


PSEUDO_LABELS = "pseudoLabels"


def pseudo_label_stats(metrics: Mapping[str, Any]) -> PseudoLabelStats | None:
    """The classifier's pseudo-label metrics (`pseudoLabels`, `pseudoLabels/<label>`,
    `pseudoLabelAccuracy`, `weakLabelAccuracy`) as one record; None without co-training."""
    if PSEUDO_LABELS not in metrics:
        return None
    prefix = f"{PSEUDO_LABELS}/"
    return PseudoLabelStats(
        total=int(metrics[PSEUDO_LABELS]),
        per_class={
            key.removeprefix(prefix): int(value)
            for key, value in sorted(metrics.items())
            if key.startswith(prefix)
        },
        accuracy=metrics.get("pseudoLabelAccuracy"),
        weak_label_accuracy=metrics.get("weakLabelAccuracy"),
    )
