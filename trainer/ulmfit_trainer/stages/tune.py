"""The tune stage: a Ray Tune sweep over the classifier stage's hyperparameters.

One process (``python -m ulmfit_trainer tune --config FILE``, no torchrun) starts Ray - or joins
the cluster named by ``RAY_ADDRESS`` (a KubeRay RayJob) - and runs each trial as the classifier
stage itself, in-process, as a group of one. The classifier reports after every unfreezing phase,
so the scheduler (ASHA by default) can stop a weak trial between phases; every phase is committed
to the store under the trial's own key, so a restarted trial resumes after its last finished
phase. The sweep's final checkpoint holds ``bestParams`` (wire names) and ``results.json`` (every
trial, its parameters, last metric and status); ``sweep.apply_best_params`` hands them to the
classifier stage that follows.

Here live the stage (`run`: Ray up, the sweep, the final checkpoint), Ray's scheduler and
searcher, and one trial (`run_trial`). The bookkeeping that needs neither Ray nor torch (the
search space, the trial records and table, the live `Board`) is ``stages.sweep``. Ray is imported
only where a sweep runs, torch only where a trial runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ulmfit_trainer.config import (
    ClassifierStageSpec,
    SchedulerKind,
    SearchAlgorithm,
    StageConfig,
    StageName,
    TuneSpec,
)
from ulmfit_trainer.errors import InvalidSpec, PermanentError
from ulmfit_trainer.records import StageResult
from ulmfit_trainer.stages.sweep import (
    Board,
    TrialRecord,
    best_record,
    check_space,
    counts,
    error_line,
    finished_status,
    max_phases,
    plain_params,
    search_space,
    trial_name,
    trial_order,
    trial_store_key,
    with_params,
)
from ulmfit_trainer.store import CheckpointStore, open_checkpoints

log = logging.getLogger(__name__)

DASHBOARD_HOST_ENV = "ULMFIT_RAY_DASHBOARD_HOST"
DASHBOARD_PORT_ENV = "ULMFIT_RAY_DASHBOARD_PORT"
NUM_CPUS_ENV = "ULMFIT_RAY_NUM_CPUS"
DEFAULT_DASHBOARD_PORT = 8265
OBJECT_STORE_BYTES = 256 * 1024**2  # trials exchange only small dicts; keep shared memory small
EXPERIMENT = "sweep"
RESULTS_FILE = "results.json"
TRIAL_STATE_FILE = "trial.json"
ASHA_REDUCTION_FACTOR = 2  # few trials per sweep: halve at each rung rather than keep a quarter


# --------------------------------------------------------------------------- the stage


def run(config: StageConfig) -> dict[str, float]:
    """The sweep: Ray on this machine (or the cluster in ``RAY_ADDRESS``), one classifier run
    per trial; commits the stage's final checkpoint with the best parameters."""
    started = time.monotonic()
    tune_spec, base = config.tune, config.classifier
    assert tune_spec is not None and base is not None  # StageConfig validates tune stages
    check_space(tune_spec, base)
    checkpoints = open_checkpoints(config)
    done = checkpoints.final(config.key)
    if done is not None:
        return dict(done.meta.get("metrics", {}))
    if config.init_from is not None and checkpoints.final(config.init_from.value) is None:
        raise PermanentError(
            f"stage {config.key} starts from stage {config.init_from.value}, which has no final "
            f"checkpoint under {checkpoints.store.uri(checkpoints.run)}"
        )
    _prepare_tokenizer(config, checkpoints)
    _mirror_backbones(config, checkpoints)

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
        meta = StageResult(metrics=metrics, best_params=best.params).to_meta() | {
            "bestTrial": best.trial,
            "bestStoreKey": best.store_key,
            "metric": tune_spec.metric,
            "mode": tune_spec.mode,
            "durationSeconds": metrics["durationSeconds"],
            "dashboard": board.dashboard,
        }
        checkpoints.save(config.key, "final", tmp, meta, final=True)
    if not local_results:
        shutil.rmtree(storage, ignore_errors=True)
    board.report("completed", metrics=metrics, best_params=best.params)
    print(
        f"best trial {best.trial}: {tune_spec.metric}={best.metric:.4f} {best.params}", flush=True
    )
    return metrics


def _mirror_backbones(config: StageConfig, checkpoints: CheckpointStore) -> None:
    """Copy `hf://` backbones into the job's store once, here, when no stage did yet: concurrent
    trials would each download and copy them (`ulmfit_trainer.hub_mirror`)."""
    wanted = [
        (uri, field)
        for uri, field in (
            (config.model.pretrained, "model.pretrained"),
            (config.tokenizer.pretrained, "tokenizer.pretrained"),
        )
        if uri and uri.startswith("hf://")
    ]
    if not wanted:
        return  # and the driver never imports torch: seconds off every sweep's start
    import torch

    from ulmfit_trainer.engine import Dist
    from ulmfit_trainer.hub_mirror import HubMirror

    alone = Dist(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"))
    mirror = HubMirror(checkpoints, config.s3, alone)
    for uri, field in wanted:
        if mirror.mirrors:
            mirror.ensure(uri, field)


def _prepare_tokenizer(config: StageConfig, checkpoints: CheckpointStore) -> None:
    """Train the job's tokenizer once, here, when no stage did yet: concurrent trials would each
    train and upload their own."""
    marker = f"{checkpoints.artifact_key('tokenizer')}/tokenizer.json"  # tokenize.TOKENIZER_FILE
    # A pretrained tokenizer, or a pretrained model's own, needs no training.
    if config.tokenizer.pretrained or config.model.pretrained or checkpoints.store.exists(marker):
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
            # No max_concurrent_trials: the searcher carries `concurrentTrials` (`_searcher`).
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
    """The search, bounded to `concurrentTrials` at once. The bound lives here for every kind:
    Tune's own `max_concurrent_trials` applies to a `Searcher` (Optuna) only and is dropped, with
    a log warning, for the random search's generator, leaving every free CPU running a trial."""
    limit = tune_spec.concurrent_trials
    if tune_spec.search_algorithm == SearchAlgorithm.OPTUNA:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=seed)
        return ConcurrencyLimiter(search, max_concurrent=limit) if limit else search
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Seeded: a rerun sweep samples the same configurations, so its trials resume.
    return BasicVariantGenerator(random_state=seed, max_concurrent=limit or 0)


def _records(grid: Any, board: Board) -> list[TrialRecord]:
    """Every trial's final state, from Tune's results (the board knows the live ones)."""
    records = []
    for result in grid:
        name = Path(str(result.path)).name
        last = result.metrics or {}
        known = board.records.get(name)
        record = known or TrialRecord(trial=name, params=plain_params(result.config or {}))
        record.params = plain_params(result.config or record.params)
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
    return sorted(records, key=trial_order)


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
    params = plain_params(params)
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

    # Here, not at the top: the driver (this module) runs without torch; a trial needs it.
    from ulmfit_trainer.stages import classifier

    metrics = classifier.run(trial_config, report=report)
    if not reported and metrics:
        # Finished in an earlier run of the sweep: its stored result still counts.
        report({**metrics, "phase": metrics.get("phases", 0)})


def _single_process(cpus: float) -> None:
    """Make this Ray worker a process group of one, with its share of threads.

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
    checkpoints = open_checkpoints(config)
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
