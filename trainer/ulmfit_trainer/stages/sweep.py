"""A sweep's bookkeeping, without Ray or torch: the search space, the best parameters, the trials.

Here live the search-space checks and their translation to Ray Tune's samplers (`check_space`,
`search_space`), `with_params`/`apply_best_params` (a classifier spec with a sweep's parameters),
the trial records and their fixed-width table, and the `Board`: the sweep as its driver shows it
(the table on stdout, the progress record to the local runner and the operator). The tune stage
(``stages.tune``) runs the sweep with Ray; the classifier stage reads a finished sweep's best
parameters through `apply_best_params`. Ray is imported only inside `ray_domain`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args, get_origin

from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from ulmfit_trainer.config import (
    TUNABLE,
    ClassifierStageSpec,
    DomainKind,
    SchedulerKind,
    SearchAlgorithm,
    SearchDomain,
    StageConfig,
    TuneSpec,
)
from ulmfit_trainer.errors import InvalidSpec, PermanentError
from ulmfit_trainer.progress import report_progress
from ulmfit_trainer.records import StageProgress
from ulmfit_trainer.store import CheckpointStore

log = logging.getLogger(__name__)

TABLE_INTERVAL_SECONDS = 10.0
MAX_PHASES = 100  # ClassifierStageSpec.unfreezePhases' upper bound

SPACE_FIELD = "stages.tune.space"


# --------------------------------------------------------------------------- pure: the space


def integer_fields() -> frozenset[str]:
    """Wire names of the classifier's integer-valued settings."""

    def kinds(annotation: Any) -> set[Any]:
        if get_origin(annotation) is Annotated:
            return kinds(get_args(annotation)[0])
        args = get_args(annotation)
        return set().union(*(kinds(a) for a in args)) if args else {annotation}

    names = set()
    for name, info in ClassifierStageSpec.model_fields.items():
        found = kinds(info.annotation)
        if int in found and float not in found:
            names.add(to_camel(name))
    return frozenset(names)


def with_params(
    spec: ClassifierStageSpec, params: Mapping[str, Any], where: str
) -> ClassifierStageSpec:
    """``spec`` with ``params`` (wire names) applied, validated like a job spec would be."""
    unknown = sorted(set(params) - set(TUNABLE))
    if unknown:
        raise InvalidSpec([(f"{where}.{unknown[0]}", params[unknown[0]], "is not tunable")])
    try:
        return ClassifierStageSpec.model_validate({**spec.to_wire(), **params})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"])
            value = params.get(name, error.get("input"))
            problems.append((f"{where}.{name}" if name else where, value, error["msg"]))
        raise InvalidSpec(problems) from None


def _candidates(name: str, domain: SearchDomain, integer: bool) -> list[float]:
    """The values that bound what ``domain`` can yield (its ends, or every choice)."""
    where = f"{SPACE_FIELD}.{name}"
    if domain.type == DomainKind.CHOICE:
        values = list(domain.values)
        if integer:
            fractional = [v for v in values if v != int(v)]
            if fractional:
                raise InvalidSpec([(f"{where}.values", fractional[0], "must be whole numbers")])
            return [int(v) for v in values]
        return values
    assert domain.low is not None and domain.high is not None  # SearchDomain checks it
    if integer or domain.type == DomainKind.INT:
        low, high = math.ceil(domain.low), math.floor(domain.high)
        if low > high:
            raise InvalidSpec([(where, [domain.low, domain.high], "holds no whole number")])
        return [low, high]
    return [domain.low, domain.high]


def check_space(tune: TuneSpec, base: ClassifierStageSpec) -> None:
    """Every value the space can yield must be a valid classifier setting: a bad bound fails
    here, naming the field, instead of in every trial."""
    integers = integer_fields()
    for name, domain in tune.space.items():
        for value in _candidates(name, domain, name in integers):
            with_params(base, {name: value}, SPACE_FIELD)
    if tune.scheduler == SchedulerKind.PBT and tune.search_algorithm != SearchAlgorithm.RANDOM:
        raise InvalidSpec(
            [("stages.tune.searchAlgorithm", tune.search_algorithm.value,
              "population-based training samples its own configurations: use `random`")]
        )  # fmt: skip
    if tune.search_algorithm == SearchAlgorithm.OPTUNA and not optuna_installed():
        raise InvalidSpec(
            [("stages.tune.searchAlgorithm", "optuna",
              "the optuna package is not installed in the trainer image")]
        )  # fmt: skip


def optuna_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("optuna") is not None


def ray_domain(name: str, domain: SearchDomain, integer: bool) -> Any:
    """One search domain as Ray Tune's sampler (``high`` inclusive, as the spec says)."""
    from ray import tune

    values = _candidates(name, domain, integer)
    if domain.type == DomainKind.CHOICE:
        return tune.choice(values)
    low, high = values
    if domain.type == DomainKind.INT or (integer and domain.type == DomainKind.UNIFORM):
        return tune.randint(int(low), int(high) + 1)
    if domain.type == DomainKind.LOGUNIFORM:
        if integer:
            return tune.lograndint(int(low), int(high) + 1)
        return tune.loguniform(low, high)
    return tune.uniform(low, high)


def search_space(tune: TuneSpec) -> dict[str, Any]:
    integers = integer_fields()
    return {name: ray_domain(name, d, name in integers) for name, d in tune.space.items()}


def max_phases(tune: TuneSpec, base: ClassifierStageSpec) -> int:
    """The most phases a trial can report (ASHA's ``max_t``): a trial stopped at ``max_t`` must
    have finished, never been cut short."""
    domain = tune.space.get("unfreezePhases")
    if domain is not None:
        return int(max(_candidates("unfreezePhases", domain, True)))
    return base.unfreeze_phases or MAX_PHASES


def params_key(params: Mapping[str, Any]) -> str:
    """A short, stable digest of a trial's parameters."""
    text = json.dumps(dict(params), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def trial_store_key(stage_key: str, trial_name: str, params: Mapping[str, Any]) -> str:
    """The store key of a trial's classifier checkpoints.

    Seeded sampling gives the n-th trial of a rerun sweep the same parameters, so the key (trial
    number + parameter digest) lets a restarted sweep resume that trial after its last committed
    phase; different parameters (Optuna's later suggestions, a PBT perturbation) get a fresh key.
    """
    match = re.match(r"trial-(\d+)", trial_name)
    number = match.group(1) if match else params_key({"trial": trial_name})
    return f"{stage_key}-{number}-{params_key(params)}"


def apply_best_params(ctx: Any, spec: ClassifierStageSpec) -> ClassifierStageSpec:
    """``spec`` updated with the best parameters of the sweep ``ctx.config.tuned_by``."""
    key = ctx.config.tuned_by
    final = ctx.checkpoints.final(key)
    if final is None:
        raise PermanentError(
            f"stage {ctx.stage} takes its hyperparameters from the sweep {key!r}, which has no "
            f"final checkpoint under {ctx.checkpoints.store.uri(ctx.checkpoints.run)}"
        )
    best = final.meta.get("bestParams")
    if not isinstance(best, dict) or not best:
        raise PermanentError(f"the final checkpoint of sweep {key!r} has no bestParams")
    tuned = with_params(spec, best, f"{key}.bestParams")
    log.info("hyperparameters from sweep %s: %s", key, best)
    return tuned


# --------------------------------------------------------------------------- pure: trial records


@dataclass
class TrialRecord:
    """What the table and the summary show of one trial."""

    trial: str
    params: dict[str, Any]
    status: str = "pending"  # pending, running, completed, stopped, failed
    metric: float | None = None
    phase: int = 0
    phases: int | None = None
    error: str | None = None
    store_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        record = {
            "trial": self.trial, "params": self.params, "status": self.status,
            "metric": self.metric, "phase": self.phase, "phases": self.phases,
        }  # fmt: skip
        if self.error:
            record["error"] = self.error
        if self.store_key:
            record["storeKey"] = self.store_key
        return record


def finished_status(record: TrialRecord) -> str:
    """A trial that ended without error: completed when it trained every phase."""
    if record.phases is not None and record.phase >= record.phases:
        return "completed"
    return "stopped" if record.phase else "pending"


def counts(records: list[TrialRecord]) -> dict[str, float]:
    by = [r.status for r in records]
    planned = sum(r.phases or 0 for r in records if r.phase)
    trained = sum(r.phase for r in records)
    return {
        "trials": float(len(records)),
        "trialsCompleted": float(by.count("completed")),
        "trialsStoppedEarly": float(by.count("stopped")),
        "trialsFailed": float(by.count("failed")),
        "trialsRunning": float(by.count("running")),
        "trialsNotStarted": float(by.count("pending")),
        "phasesTrained": float(trained),
        "phasesPlanned": float(planned),
    }


def best_record(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    scored = [r for r in records if r.metric is not None and r.status != "failed"]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(scored, key=lambda r: sign * float(r.metric or 0.0))


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trial_table(records: list[TrialRecord], metric: str) -> list[str]:
    """A fixed-width table of the trials, one line each."""
    rows = [("trial", "status", "phase", metric, "params")]
    for r in records:
        params = " ".join(f"{k}={_short(v)}" for k, v in sorted(r.params.items()))
        phases = f"{r.phase}/{r.phases}" if r.phases else str(r.phase)
        shown = "-" if r.metric is None else f"{r.metric:.4f}"
        rows.append((r.trial, r.status, phases, shown, params))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
        + "  "
        + row[4]
        for row in rows
    ]


def error_line(error: BaseException | str | None) -> str:
    """The gist of a trial's error: its last ``Type: message`` line (Ray wraps tracebacks)."""
    text = str(error or "").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b.*:", line):
            return line[:500]
    return (lines[-1] if lines else "unknown error")[:500]


def trial_name(trial: Any) -> str:
    """``trial-<n>``: the sweep's n-th configuration (the tag Ray numbers trials by)."""
    number = str(trial.experiment_tag).split("_", 1)[0]
    return f"trial-{number}-{trial.trial_id}"


def trial_order(record: TrialRecord) -> tuple[int, str]:
    match = re.match(r"trial-(\d+)", record.trial)
    return (int(match.group(1)) if match else 0, record.trial)


def plain_params(params: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        if hasattr(value, "item"):  # numpy scalars from the samplers
            value = value.item()
        out[key] = value
    return out


# --------------------------------------------------------------------------- live table


@dataclass
class Board:
    """The sweep as the driver sees it: a table on stdout and ``progress.json`` in the store."""

    config: StageConfig
    checkpoints: CheckpointStore
    records: dict[str, TrialRecord] = field(default_factory=dict)
    dashboard: str | None = None
    _shown: float = 0.0

    @property
    def metric(self) -> str:
        assert self.config.tune is not None
        return self.config.tune.metric

    def update(self, trial: Any, result: Mapping[str, Any] | None = None, status: str = "") -> None:
        name = trial_name(trial)
        record = self.records.setdefault(name, TrialRecord(name, plain_params(trial.config or {})))
        if result:
            record.phase = int(result.get("phase", result.get("training_iteration", 0)) or 0)
            if "phases" in result:
                record.phases = int(result["phases"])
            value = result.get(self.metric)
            if isinstance(value, int | float):
                record.metric = float(value)
            record.store_key = result.get("storeKey", record.store_key)
        if status == "error":
            record.status = "failed"
        elif status == "complete":
            record.status = finished_status(record)
        elif status:
            record.status = status
        self.show(force=status in ("complete", "error"))

    def show(self, force: bool = False, state: str | None = "running") -> None:
        """Print the table (at most every few seconds unless forced) and report ``state``."""
        now = time.monotonic()
        if not force and now - self._shown < TABLE_INTERVAL_SECONDS:
            return
        self._shown = now
        records = sorted(self.records.values(), key=trial_order)
        print("\n".join(trial_table(records, self.metric)), flush=True)
        if state:
            self.report(state)

    def report(self, state: str, **extra: Any) -> StageProgress:
        """One ``@progress`` line (the local runner's) and ``progress.json`` (the operator's);
        ``extra`` sets other ``StageProgress`` fields (``metrics=...``, ``best_params=...``)."""
        assert self.config.tune is not None
        records = list(self.records.values())
        totals = counts(records)
        done = totals["trialsCompleted"] + totals["trialsStoppedEarly"] + totals["trialsFailed"]
        best = best_record(records, self.config.tune.mode)
        fields: dict[str, Any] = {
            "stage": self.config.key,
            "step": int(done),
            "total_steps": self.config.tune.trials,
            "state": state,
            "trials": {k: int(v) for k, v in totals.items() if k.startswith("trials")},
            "dashboard": self.dashboard or None,
            "best_metric": best.metric if best is not None else None,
            "best_trial": best.trial if best is not None else None,
            **extra,
        }
        return report_progress(self.checkpoints, StageProgress(**fields))
