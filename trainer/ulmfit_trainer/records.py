"""What crosses from the trainer to its readers: typed records, defined once.

The trainer writes them; the operator (through the store) and the local runner (through the
stage's stdout) read them. Three records cross that seam:

- `StageProgress`: a stage's latest progress, as `<run>/<stage>/progress.json` and as one
  `@progress {...}` line on stdout.
- `CheckpointRecord`: a checkpoint's `meta.json`, written last, so its presence commits the
  checkpoint; `StageResult` is the part of it a stage fills in (`meta`).
- `EvaluationSummary`: the flat numbers the evaluate stage records as its result's metrics.

Writers build the models; readers parse with `parse_*`, which never raise on a malformed record
written by someone else: they return `None` (or raise the `ValueError` the caller turns into its
own error). Keys on the wire are camelCase. A record built here is stamped with the time now; a
record read keeps what it says (a missing timestamp reads as ""), so an old record never looks
fresh. No torch or I/O library is imported here: the operator imports this module.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

PROGRESS_PREFIX = "@progress "
"""Start of a progress line on a stage's stdout; the rest of the line is a `StageProgress`."""

FORMAT_VERSION = 1
"""`CheckpointRecord.format_version` this trainer writes."""

ProgressState = Literal["starting", "running", "completed", "failed", "stopped"]


def now_iso() -> str:
    """UTC now as `2026-01-02T03:04:05.678Z`, the timestamp format of every record."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Record(BaseModel):
    """camelCase on the wire; unknown keys are kept when reading (a newer writer may add some)
    and written back unchanged."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The record as a JSON-ready dict, `None` fields left out. Python mode, so a float
        stays a float (NaN included, as `json.dumps` writes it) instead of turning into null."""
        return self.model_dump(by_alias=True, exclude_none=True)


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors()
    )


def _object(raw: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """A record's decoded JSON object; `ValueError` when it is not one."""
    data = json.loads(raw) if isinstance(raw, bytes | str) else raw
    if not isinstance(data, dict):
        raise ValueError(f"record: expected a JSON object, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------- progress


class StageProgress(_Record):
    """A stage's latest progress report."""

    stage: str
    """The stage's store key (`tune` for any tune stage)."""
    state: str
    """`starting`, `running`, `completed`, `failed` or `stopped`."""
    updated_at: str = Field(default_factory=now_iso)
    """When the report was made (UTC, ISO 8601); "" in a record read that did not say."""
    phase: str | int | None = None
    """The phase within the stage (a gradual-unfreezing phase, a co-training round)."""
    total_phases: int | None = None
    step: int = 0
    """Steps done in this stage (trials done, for a sweep)."""
    total_steps: int | None = None
    loss: float | None = None
    """Mean training loss since the previous report."""
    tokens_per_second: float | None = None
    """Tokens per second, all ranks together, since the previous report."""
    metrics: dict[str, Any] | None = None
    """The stage's result metrics, on the `completed` report."""
    trials: dict[str, int] | None = None
    """A sweep's trial counts by state (`trialsCompleted`, `trialsRunning`, ...)."""
    best_metric: float | None = None
    best_trial: str | None = None
    best_params: dict[str, Any] | None = None
    dashboard: str | None = None
    """Where a sweep's Ray dashboard can be reached, when it runs one."""
    error: str | None = None
    """The error line, on a `failed` report: `Type: message`."""
    invalid: bool | None = None
    """On a `failed` report: true when the stage found its input invalid (an `InvalidSpec`: a
    field of the spec or the data it names will not do), so retrying cannot help and the local
    runner exits 2; absent otherwise."""
    rank: int | None = None
    """The rank that made a `failed` report (any rank may fail; rank 0 makes the others)."""

    def to_json(self) -> str:
        """The `progress.json` body (without its trailing newline)."""
        return json.dumps(self.to_wire(), sort_keys=True)

    def to_line(self) -> str:
        """The stdout line: `@progress {...}`."""
        return PROGRESS_PREFIX + self.to_json()


def load_progress(raw: bytes | str | dict[str, Any]) -> StageProgress:
    """A `progress.json` body (or its decoded object). Raises `ValueError` naming what is wrong."""
    data = _object(raw)
    try:
        return StageProgress.model_validate({"updatedAt": "", **data})
    except ValidationError as exc:
        raise ValueError(_problems(exc)) from None


def parse_progress(raw: bytes | str | dict[str, Any]) -> StageProgress | None:
    """A `progress.json` body (or its decoded object); `None` when it is not a progress record."""
    try:
        return load_progress(raw)
    except ValueError:
        return None


def parse_progress_line(line: str) -> StageProgress | None:
    """The record on a `@progress {...}` stdout line; `None` for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    return parse_progress(line[len(PROGRESS_PREFIX) :])


# ------------------------------------------------------------------------------- checkpoints


class StageResult(_Record):
    """What a stage records in its checkpoint's meta. Stages may add their own keys (resume
    state such as the next phase); the ones below are the ones readers rely on."""

    metrics: dict[str, Any] = Field(default_factory=dict)
    """Result metrics: numbers, plus structured entries a stage finds useful."""
    model_uri: str | None = None
    """Where the stage exported a model (the evaluate stage)."""
    best_params: dict[str, Any] | None = None
    """The best hyperparameters found (a tune stage)."""

    def numeric_metrics(self) -> dict[str, float]:
        """The numeric scalars of `metrics` (what fits a status field)."""
        return numeric_values(self.metrics)

    def to_meta(self) -> dict[str, Any]:
        """What goes into `CheckpointRecord.meta`: exactly the keys the stage set (a `None` it
        set stays null), so a reader sees what was written."""
        return self.model_dump(by_alias=True, exclude_unset=True)


class CheckpointFile(_Record):
    path: str
    size: int = Field(ge=0)
    sha256: str


class CheckpointRecord(_Record):
    """A checkpoint's `meta.json`."""

    format_version: int = FORMAT_VERSION
    stage: str
    tag: str
    step: int = 0
    phase: str | int | None = None
    final: bool = False
    """The stage is finished once a final checkpoint is committed."""
    created_at: str = Field(default_factory=now_iso)
    """When it was committed (UTC, ISO 8601); "" in a record read that did not say."""
    meta: dict[str, Any] = Field(default_factory=dict)
    """The stage's own record; see `StageResult`."""
    files: list[CheckpointFile]
    """Every file of the checkpoint; a record without the list is corrupt, not empty."""

    def result(self) -> StageResult:
        return StageResult.model_validate(self.meta)

    def to_json(self) -> str:
        """The `meta.json` body: every key, a null `phase` included, as this format has always
        been written."""
        return json.dumps(self.model_dump(by_alias=True), indent=2, sort_keys=True) + "\n"


def parse_checkpoint_record(raw: bytes | str) -> CheckpointRecord:
    """A `meta.json` body. Raises `ValueError` naming what is wrong."""
    data = _object(raw)
    try:
        return CheckpointRecord.model_validate({"createdAt": "", **data})
    except ValidationError as exc:
        raise ValueError(_problems(exc)) from None


# -------------------------------------------------------------------------------- evaluation


class EvaluationSummary(_Record):
    """The evaluate stage's metrics: what `status.result.testMetrics` shows."""

    accuracy: float
    """Test accuracy (exact match for multi-label)."""
    macro_f1: float
    """Mean F1 over the labels (`macroF1` on the wire)."""
    majority_baseline_accuracy: float
    """Accuracy of always predicting the training set's most common label (set)."""
    expected_calibration_error: float
    test_examples: float


def parse_evaluation(metrics: dict[str, Any]) -> EvaluationSummary | None:
    """The evaluate stage's summary from its metrics; `None` when they are not one."""
    try:
        return EvaluationSummary.model_validate(metrics)
    except ValidationError:
        return None


def numeric_values(raw: Any) -> dict[str, float]:
    """The finite int and float entries of a mapping (booleans and everything else left out)."""
    if not isinstance(raw, dict):
        return {}
    return {
        str(key): float(value)
        for key, value in raw.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


__all__ = [
    "FORMAT_VERSION",
    "PROGRESS_PREFIX",
    "CheckpointFile",
    "CheckpointRecord",
    "EvaluationSummary",
    "StageProgress",
    "StageResult",
    "load_progress",
    "now_iso",
    "numeric_values",
    "parse_checkpoint_record",
    "parse_evaluation",
    "parse_progress",
    "parse_progress_line",
]
