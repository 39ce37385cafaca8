"""The tune stage: a Ray Tune sweep over the classifier stage's hyperparameters.

One process (``python -m ulmfit_trainer tune --config FILE``, no torchrun) starts Ray - or joins
the cluster named by ``RAY_ADDRESS`` (a KubeRay RayJob) - and runs each trial as the classifier
stage itself, in-process, as a group of one. The classifier reports after every unfreezing phase,
so the scheduler (ASHA by default) can stop a weak trial between phases; every phase is committed
to the store under the trial's own key, so a restarted trial resumes after its last finished
phase. The sweep's final checkpoint holds ``bestParams`` (wire names) and ``results.json`` (every
trial, its parameters, last metric and status); ``apply_best_params`` hands them to the classifier
stage that follows.

Ray and torch are imported only where a sweep or a trial runs: the pure parts (search-space
checks and translation, best-parameter application, the trial table) need neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
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
    StageName,
    TuneSpec,
)
from ulmfit_trainer.errors import InvalidSpec, PermanentError

log = logging.getLogger(__name__)

PROGRESS_PREFIX = "@progress "  # the same line format as engine.Progress (no torch import here)
DASHBOARD_HOST_ENV = "ULMFIT_RAY_DASHBOARD_HOST"
DASHBOARD_PORT_ENV = "ULMFIT_RAY_DASHBOARD_PORT"
NUM_CPUS_ENV = "ULMFIT_RAY_NUM_CPUS"
DEFAULT_DASHBOARD_PORT = 8265
OBJECT_STORE_BYTES = 256 * 1024**2  # trials exchange only small dicts; keep shared memory small
EXPERIMENT = "sweep"
RESULTS_FILE = "results.json"
TRIAL_STATE_FILE = "trial.json"
TABLE_INTERVAL_SECONDS = 10.0
ASHA_REDUCTION_FACTOR = 2  # few trials per sweep: halve at each rung rather than keep a quarter
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
    finals = [c for c in ctx.checkpoints.committed(key) if c.final]
    if not finals:
        raise PermanentError(
            f"stage {ctx.stage} takes its hyperparameters from the sweep {key!r}, which has no "
            f"final checkpoint under {ctx.checkpoints.store.uri(ctx.checkpoints.run)}"
        )
    best = finals[-1].meta.get("bestParams")
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


# --------------------------------------------------------------------------- the stage


def run(config: StageConfig) -> dict[str, float]:
    """The sweep: Ray on this machine (or the cluster in ``RAY_ADDRESS``), one classifier run
    per trial; commits the stage's final checkpoint with the best parameters."""
    from ulmfit_trainer.store import CheckpointStore, open_store

    started = time.monotonic()
    tune_spec, base = config.tune, config.classifier
    assert tune_spec is not None and base is not None  # StageConfig validates tune stages
    check_space(tune_spec, base)
    checkpoints = CheckpointStore(open_store(config.store_root, config.s3), config.run)
    finals = [c for c in checkpoints.committed(config.key) if c.final]
    if finals:
        return dict(finals[-1].meta.get("metrics", {}))
    if config.init_from is not None and not any(
        c.final for c in checkpoints.committed(config.init_from.value)
    ):
        raise PermanentError(
            f"stage {config.key} starts from stage {config.init_from.value}, which has no final "
            f"checkpoint under {checkpoints.store.uri(checkpoints.run)}"
        )
    _prepare_tokenizer(config, checkpoints)

    board = Board(config, checkpoints)
    local_results = not config.store_root.startswith("s3://")
    if local_results:
        storage = Path(config.store_root).resolve() / config.run / config.key / "ray-results"
    else:
        storage = Path(tempfile.mkdtemp(prefix="ulmfit-ray-results-"))
    storage.mkdir(parents=True, exist_ok=True)

    # Ray reads these at import. Its dashboard starts a dozen module processes; on a busy
    # machine Ray's defaults (30 s per module, 60 s in all) are not always enough.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DASHBOARD_SUBPROCESS_MODULE_WAIT_READY_TIMEOUT", "180")
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "240")
    import ray

    _stop_on_sigterm()
    try:
        board.dashboard = _start_ray(tune_spec)
        records = _sweep(config, tune_spec, base, storage, board)
    finally:
        ray.shutdown()
    board.records = {r.trial: r for r in records}
    board.show(force=True, state=None)

    totals = counts(records)
    best = best_record(records, tune_spec.mode)
    if best is None:
        failed = [r for r in records if r.status == "failed"]
        if failed and len(failed) == len(records):
            message = f"all {len(records)} trials of the sweep failed"
        else:
            message = (
                f"no trial of the sweep reported {tune_spec.metric} "
                f"({len(failed)} of {len(records)} failed)"
            )
        if failed:
            message += f"; the first error ({failed[0].trial}): {failed[0].error}"
        raise PermanentError(message)
    assert best.metric is not None
    metrics = {
        "bestMetric": best.metric,
        tune_spec.metric: best.metric,
        **totals,
        "durationSeconds": time.monotonic() - started,
    }
    summary = {
        "metric": tune_spec.metric,
        "mode": tune_spec.mode,
        "bestTrial": best.trial,
        "bestParams": best.params,
        "metrics": metrics,
        "experimentPath": str(storage / EXPERIMENT) if local_results else None,
        "trials": [r.to_json() for r in records],
    }
    with tempfile.TemporaryDirectory(prefix="ulmfit-tune-") as tmp:
        Path(tmp, RESULTS_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        meta = {
            "bestParams": best.params,
            "bestTrial": best.trial,
            "bestStoreKey": best.store_key,
            "metric": tune_spec.metric,
            "mode": tune_spec.mode,
            "metrics": metrics,
            "durationSeconds": metrics["durationSeconds"],
            "dashboard": board.dashboard,
        }
        checkpoints.save(config.key, "final", tmp, meta, final=True)
    if not local_results:
        shutil.rmtree(storage, ignore_errors=True)
    board.report("completed", metrics=metrics, bestParams=best.params)
    print(
        f"best trial {best.trial}: {tune_spec.metric}={best.metric:.4f} {best.params}", flush=True
    )
    return metrics


def _prepare_tokenizer(config: StageConfig, checkpoints: Any) -> None:
    """Train the job's tokenizer once, here, when no stage did yet: concurrent trials would each
    train and upload their own."""
    marker = f"{checkpoints.artifact_key('tokenizer')}/tokenizer.json"  # tokenize.TOKENIZER_FILE
    if config.tokenizer.pretrained or checkpoints.store.exists(marker):
        return
    from ulmfit_trainer.data import load_dataset
    from ulmfit_trainer.tokenize import job_tokenizer

    with tempfile.TemporaryDirectory(prefix="ulmfit-tune-tok-") as work:
        dataset = load_dataset(config.data, config.s3, config.seed, work)
        job_tokenizer(
            config, checkpoints,
            lambda: dataset.texts("train") + dataset.texts("unlabeled"),
            rank=0, barrier=lambda: None, workdir=work,
        )  # fmt: skip


def _start_ray(tune_spec: TuneSpec) -> str | None:
    """Join ``RAY_ADDRESS``'s cluster, or start Ray here with the dashboard; its URL."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(log_to_driver=False)
    else:
        cpus = os.environ.get(NUM_CPUS_ENV)
        settings: dict[str, Any] = {
            "num_cpus": int(cpus) if cpus else _local_cores(),
            "object_store_memory": OBJECT_STORE_BYTES,
            "log_to_driver": False,
        }
        try:
            context = ray.init(
                include_dashboard=True,
                dashboard_host=os.environ.get(DASHBOARD_HOST_ENV) or "127.0.0.1",
                dashboard_port=int(os.environ.get(DASHBOARD_PORT_ENV) or DEFAULT_DASHBOARD_PORT),
                **settings,
            )
        except Exception as exc:  # the sweep matters more than its dashboard
            if "dashboard" not in str(exc).lower():
                raise
            log.warning("the Ray dashboard did not start, sweeping without it: %s", exc)
            ray.shutdown()
            context = ray.init(include_dashboard=False, **settings)
        available = ray.cluster_resources()
        for name, want, have in (
            ("cpusPerTrial", tune_spec.cpus_per_trial, available.get("CPU", 0.0)),
            ("gpusPerTrial", tune_spec.gpus_per_trial, available.get("GPU", 0.0)),
        ):
            if want > have:
                raise InvalidSpec(
                    [(f"stages.tune.{name}", want, f"this machine has only {have:g}")]
                )
    url = getattr(context, "dashboard_url", None)
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def _stop_on_sigterm() -> None:
    """SIGTERM (a pod or the local runner stopping the stage) unwinds like an exception, so
    Ray's processes are shut down rather than orphaned."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _sweep(
    config: StageConfig,
    tune_spec: TuneSpec,
    base: ClassifierStageSpec,
    storage: Path,
    board: Board,
) -> list[TrialRecord]:
    from ray import tune

    space = search_space(tune_spec)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, stage=config.to_wire()),
        {"cpu": tune_spec.cpus_per_trial, "gpu": tune_spec.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=tune_spec.metric,
            mode=tune_spec.mode,
            num_samples=tune_spec.trials,
            max_concurrent_trials=tune_spec.concurrent_trials,
            time_budget_s=tune_spec.time_budget_seconds,
            scheduler=_scheduler(tune_spec, base, space),
            search_alg=_searcher(tune_spec, config.seed),
            # A finished trial's process takes the next one: torch, DeepSpeed and the process
            # group (of one) are set up once per worker, not per trial.
            reuse_actors=True,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(storage),
            verbose=0,
            log_to_file=True,  # each trial's output in <trial dir>/stdout, stderr
            callbacks=[_ray_callback(board)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    board.report("running")
    print(f"Ray dashboard: {board.dashboard or 'unavailable'}", flush=True)
    grid = tuner.fit()
    return _records(grid, board)


def trial_name(trial: Any) -> str:
    """``trial-<n>``: the sweep's n-th configuration (the tag Ray numbers trials by)."""
    number = str(trial.experiment_tag).split("_", 1)[0]
    return f"trial-{number}-{trial.trial_id}"


def _scheduler(tune_spec: TuneSpec, base: ClassifierStageSpec, space: dict[str, Any]) -> Any:
    from ray.tune import schedulers

    grace = tune_spec.grace_period
    if tune_spec.scheduler == SchedulerKind.ASHA:
        return schedulers.ASHAScheduler(
            time_attr="training_iteration",
            max_t=max(grace, max_phases(tune_spec, base)),
            grace_period=grace,
            reduction_factor=ASHA_REDUCTION_FACTOR,
        )
    if tune_spec.scheduler == SchedulerKind.MEDIAN:
        return schedulers.MedianStoppingRule(time_attr="training_iteration", grace_period=grace)
    if tune_spec.scheduler == SchedulerKind.PBT:
        return schedulers.PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=grace,
            hyperparam_mutations=space,
        )
    return schedulers.FIFOScheduler()


def _searcher(tune_spec: TuneSpec, seed: int) -> Any:
    if tune_spec.search_algorithm == SearchAlgorithm.OPTUNA:
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Seeded: a rerun sweep samples the same configurations, so its trials resume.
    return BasicVariantGenerator(random_state=seed)


def _records(grid: Any, board: Board) -> list[TrialRecord]:
    """Every trial's final state, from Tune's results (the board knows the live ones)."""
    records = []
    for result in grid:
        name = Path(str(result.path)).name
        last = result.metrics or {}
        known = board.records.get(name)
        record = known or TrialRecord(trial=name, params=_plain(result.config or {}))
        record.params = _plain(result.config or record.params)
        if last:
            record.phase = int(last.get("phase", last.get("training_iteration", 0)) or 0)
            record.phases = int(last["phases"]) if "phases" in last else record.phases
            value = last.get(board.metric)
            record.metric = float(value) if isinstance(value, int | float) else record.metric
            record.store_key = last.get("storeKey", record.store_key)
        if result.error is not None:
            record.status, record.error = "failed", error_line(result.error)
        else:
            record.status = finished_status(record)
        records.append(record)
    return sorted(records, key=_trial_order)


def _trial_order(record: TrialRecord) -> tuple[int, str]:
    match = re.match(r"trial-(\d+)", record.trial)
    return (int(match.group(1)) if match else 0, record.trial)


def _plain(params: Mapping[str, Any]) -> dict[str, Any]:
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
    checkpoints: Any
    records: dict[str, TrialRecord] = field(default_factory=dict)
    dashboard: str | None = None
    _shown: float = 0.0

    @property
    def metric(self) -> str:
        assert self.config.tune is not None
        return self.config.tune.metric

    def update(self, trial: Any, result: Mapping[str, Any] | None = None, status: str = "") -> None:
        name = trial_name(trial)
        record = self.records.setdefault(name, TrialRecord(name, _plain(trial.config or {})))
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
        records = sorted(self.records.values(), key=_trial_order)
        print("\n".join(trial_table(records, self.metric)), flush=True)
        if state:
            self.report(state)

    def report(self, state: str, **extra: Any) -> None:
        """One ``@progress`` line (the local runner's) and ``progress.json`` (the operator's)."""
        assert self.config.tune is not None
        records = list(self.records.values())
        totals = counts(records)
        done = totals["trialsCompleted"] + totals["trialsStoppedEarly"] + totals["trialsFailed"]
        record: dict[str, Any] = {
            "stage": self.config.key,
            "phase": None,
            "step": int(done),
            "totalSteps": self.config.tune.trials,
            "state": state,
            "updatedAt": datetime.now(UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "trials": {k: int(v) for k, v in totals.items() if k.startswith("trials")},
        }
        if self.dashboard:
            record["dashboard"] = self.dashboard
        best = best_record(records, self.config.tune.mode)
        if best is not None:
            record["bestMetric"] = best.metric
            record["bestTrial"] = best.trial
        record.update(extra)
        print(PROGRESS_PREFIX + json.dumps(record, sort_keys=True), flush=True)
        try:
            self.checkpoints.write_progress(self.config.key, record)
        except Exception as exc:  # progress is advisory; the sweep goes on
            log.warning("could not write progress: %s", exc)


def _ray_callback(board: Board) -> Any:
    from ray import tune

    class TableCallback(tune.Callback):
        """Feeds Tune's trial events to the board (in the driver)."""

        def on_trial_start(self, iteration, trials, trial, **info):
            board.update(trial, status="running")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            board.update(trial, result, status="running")

        def on_trial_complete(self, iteration, trials, trial, **info):
            board.update(trial, status="complete")

        def on_trial_error(self, iteration, trials, trial, **info):
            board.update(trial, status="error")

        def __reduce__(self):
            # Tune saves its run config; the board (a store client, stdout) stays behind.
            return (tune.Callback, ())

    return TableCallback()


# --------------------------------------------------------------------------- one trial


def run_trial(params: dict[str, Any], stage: dict[str, Any]) -> None:
    """A Tune trainable: the classifier stage with ``params``, reporting after every phase."""
    from ray import tune

    config = StageConfig.model_validate(stage)
    assert config.tune is not None and config.classifier is not None
    params = _plain(params)
    spec = with_params(config.classifier, params, "trial parameters")
    context = tune.get_context()
    key = trial_store_key(config.key, context.get_trial_name(), params)
    trial_config = config.model_copy(
        update={"stage": StageName.CLASSIFIER, "name": key, "classifier": spec,
                "tuned_by": None, "tune": None}
    )  # fmt: skip
    _single_process(config.tune.cpus_per_trial)
    _adopt_donor(trial_config, key, tune.get_checkpoint())

    reported = False
    # Only PBT needs Tune checkpoints (to hand a trial's place to another); the store holds the
    # weights either way, and `storeKey` in every result points there.
    with_checkpoint = config.tune.scheduler == SchedulerKind.PBT

    def report(metrics: dict[str, float]) -> None:
        nonlocal reported
        reported = True
        phase = int(metrics.get("phase", 0))
        phases = int(metrics.get("phases", 0))
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        result = {**values, "storeKey": key}
        if not with_checkpoint:
            tune.report(result)
            return
        tag = "final" if phase and phase >= phases else f"phase-{phase:02d}"
        with tempfile.TemporaryDirectory(prefix="ulmfit-trial-") as tmp:
            state = {"storeKey": key, "tag": tag, "phase": phase}
            Path(tmp, TRIAL_STATE_FILE).write_text(json.dumps(state))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))

    from ulmfit_trainer.stages import classifier

    metrics = classifier.run(trial_config, report=report)
    if not reported and metrics:
        # Finished in an earlier run of the sweep: its stored result still counts.
        report({**metrics, "phase": metrics.get("phases", 0)})


def _single_process(cpus: float) -> None:
    """Make this Ray worker a process group of one on a free port, with its share of threads.

    A Ray worker inherits the driver's environment, which under torchrun names the launcher's
    rendezvous; every trial would join the same one.
    """
    for name in list(os.environ):
        if name.startswith("TORCHELASTIC_") or name in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
            "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME",
            "MASTER_ADDR", "MASTER_PORT",
        ):  # fmt: skip
            del os.environ[name]
    threads = max(1, int(cpus))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # engine.init_distributed then leaves it be
    import torch

    torch.set_num_threads(threads)


def _adopt_donor(config: StageConfig, key: str, checkpoint: Any) -> None:
    """PBT's exploit: this trial continues another trial's weights with its own (perturbed)
    parameters, so copy the donor's phase checkpoint to this trial's key."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as directory:
        path = Path(directory, TRIAL_STATE_FILE)
        state = json.loads(path.read_text()) if path.exists() else {}
    donor, tag = state.get("storeKey"), state.get("tag")
    if not donor or donor == key or not tag:
        return
    from ulmfit_trainer.store import CheckpointStore, open_store

    checkpoints = CheckpointStore(open_store(config.store_root, config.s3), config.run)
    if checkpoints.committed(key):
        return  # adopted before this restart
    source = next((c for c in checkpoints.committed(donor) if c.tag == tag), None)
    if source is None:
        print(f"donor checkpoint {donor}/{tag} is gone; training from the start", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory(prefix="ulmfit-donor-") as tmp:
        checkpoints.load(donor, tmp, tag=tag)
        checkpoints.save(key, tag, tmp, dict(source.meta), final=source.final)
    log.info("trial %s continues from %s/%s", key, donor, tag)
