"""What running the classifier through Ray Tune costs, and what ASHA saves.

Self-contained: a tiny model on the shipped Debian data in a temporary local store. In one run:

1. the tune stage with the FIFO scheduler (every trial trains every phase), one trial at a time;
2. the same N sampled configurations (read from that sweep's results.json) as plain classifier
   stages, called directly one after another in one process: the baseline;
3. the tune stage again with ASHA (same seed, so the same N configurations), one at a time.

Figures: the sweep's wall time vs the direct runs (the overhead ratio), and where the
difference goes, read from Tune's own per-trial results: the stage's start-up (imports, Ray and
its dashboard), the first trial on a fresh worker (which imports torch and DeepSpeed), a trial on
a reused worker against a direct run, and the time between trials. Then ASHA's phases trained,
trials stopped early, and its wall-time saving next to its phase saving (both against FIFO, the
walls after Ray is up). Other load on the machine moves the wall times; the phase counts do not
depend on it. `--epochs-per-phase 90` makes trials of about a minute on 2 cores, the size a user
meets; the default keeps them under 2 s, where the overhead shows most.

Prints one JSON line per figure, {"name", "value", "unit", "baseline", "ratio"}; progress goes
to stderr.

    python benchmarks/tune_overhead.py --trials 6
    python benchmarks/tune_overhead.py --trials 4 --epochs-per-phase 90
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "trainer"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from ulmfit_trainer.config import (  # noqa: E402
    ArchitectureSpec,
    ClassifierStageSpec,
    DataSpec,
    ModelSpec,
    SearchDomain,
    StageConfig,
    TokenizerSpec,
    TuneSpec,
)
from ulmfit_trainer.store import CheckpointStore, open_store  # noqa: E402

RUN = "bench/tune-overhead"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(name: str, value: float, unit: str, baseline: float) -> None:
    ratio = round(value / baseline, 3) if baseline else None
    record = {"name": name, "value": round(value, 3), "unit": unit,
              "baseline": round(baseline, 3), "ratio": ratio}  # fmt: skip
    print(json.dumps(record), flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_config(store: Path, phases: int, epochs_per_phase: float = 1) -> dict:
    return {
        "run": RUN,
        "store_root": str(store),
        "data": DataSpec(max_length=32, max_train_examples=320, max_eval_examples=128),
        "model": ModelSpec(
            architecture=ArchitectureSpec(layers=2, hidden_size=32, heads=2, context_length=32)
        ),
        "tokenizer": TokenizerSpec(vocab_size=500),
        "classifier": ClassifierStageSpec(
            unfreeze_phases=phases,
            epochs_per_phase=epochs_per_phase,
            final_epochs=0,
            batch_size=16,
            head_hidden_size=16,
            discriminative_factor=1.5,
        ),
        "progress_interval_seconds": 30.0,
    }


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "trainer"), out.get("PYTHONPATH")) if p
    )
    out.setdefault("DS_ACCELERATOR", "cpu")
    out["OMP_NUM_THREADS"] = "1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(name, None)
    return out


def run_sweep(
    store: Path, work: Path, name: str, scheduler: str, trials: int, phases: int, epochs: float
):
    """The tune stage as `ulmfit run` starts it; (wall seconds, start-up seconds, metrics)."""
    tune = TuneSpec(
        space={
            "learningRate": SearchDomain(type="loguniform", low=1e-5, high=1e-2),
            "dropout": SearchDomain(type="uniform", low=0.0, high=0.4),
        },
        metric="validLoss",
        mode="min",
        trials=trials,
        concurrent_trials=1,
        cpus_per_trial=1,
        scheduler=scheduler,
        grace_period=1,
    )
    config = StageConfig(stage="tune", name=name, tune=tune, **base_config(store, phases, epochs))
    path = work / f"{name}.json"
    config.write(path)
    environment = env()
    environment["ULMFIT_RAY_DASHBOARD_PORT"] = str(free_port())
    command = [sys.executable, "-m", "ulmfit_trainer", "tune", "--config", str(path)]
    started = time.perf_counter()
    ray_up = None
    metrics: dict = {}
    with subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("Ray dashboard:") and ray_up is None:
                ray_up = time.perf_counter() - started
            if line.startswith("@metrics "):
                metrics = json.loads(line[len("@metrics ") :])
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"the {name} sweep failed (exit {process.returncode})")
    return wall, ray_up or 0.0, metrics


def trial_times(store: Path, name: str) -> list[tuple[int, float]]:
    """(worker pid, seconds from the trial's start to its last report) per trial, in the order
    the trials started, from Tune's `result.json` files."""
    found = []
    for path in (store / RUN / name / "ray-results" / "sweep").glob("*/result.json"):
        reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if reports:
            first, last = reports[0], reports[-1]
            started = first["timestamp"] - first["time_this_iter_s"]
            found.append((started, int(last["pid"]), float(last["time_total_s"])))
    return [(pid, seconds) for _, pid, seconds in sorted(found)]


def run_direct(store: Path, params: list[dict], phases: int, epochs: float) -> float:
    """The same configurations as plain classifier stages, one after another in this process."""
    os.environ.update(env())
    import torch
    from ulmfit_trainer.stages import classifier

    # The threads a trial gets (cpusPerTrial 1): torch may have read the environment already.
    torch.set_num_threads(1)
    from ulmfit_trainer.stages.tune import with_params

    base = base_config(store, phases, epochs)
    started = time.perf_counter()
    # The stage's own progress lines stay off stdout, which carries only the figures.
    with contextlib.redirect_stdout(sys.stderr):
        for i, sample in enumerate(params):
            spec = with_params(base["classifier"], sample, "params")
            config = StageConfig(
                stage="classifier", name=f"direct-{i}", **{**base, "classifier": spec}
            )
            classifier.run(config)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--phases", type=int, default=3)
    parser.add_argument("--epochs-per-phase", type=float, default=1.0)
    args = parser.parse_args()
    trials, phases, epochs = args.trials, args.phases, args.epochs_per_phase

    with tempfile.TemporaryDirectory(prefix="ulmfit-bench-tune-") as tmp:
        work = Path(tmp)
        store = work / "store"
        # The job's tokenizer first, so no side pays for training it.
        from ulmfit_trainer.stages.tune import _prepare_tokenizer

        checkpoints = CheckpointStore(open_store(store), RUN)
        _prepare_tokenizer(StageConfig(stage="classifier", **base_config(store, 1)), checkpoints)

        say(f"FIFO sweep of {trials} trials ...")
        fifo_wall, fifo_ray, fifo = run_sweep(store, work, "fifo", "fifo", trials, phases, epochs)
        fifo_trials = trial_times(store, "fifo")
        summary = json.loads((store / RUN / "fifo" / "final" / "results.json").read_text())
        params = [t["params"] for t in summary["trials"]]
        say(f"  {fifo_wall:.1f}s (Ray up after {fifo_ray:.1f}s); direct runs ...")
        direct_wall = run_direct(store, params, phases, epochs)
        say(f"  {direct_wall:.1f}s; ASHA sweep ...")
        asha_wall, asha_ray, asha = run_sweep(store, work, "asha", "asha", trials, phases, epochs)
        say(f"  {asha_wall:.1f}s")
        asha_params = [t["params"] for t in json.loads(
            (store / RUN / "asha" / "final" / "results.json").read_text())["trials"]]  # fmt: skip

    direct_trial = direct_wall / trials
    emit("tune_fifo_wall_vs_direct", fifo_wall, "s", direct_wall)
    emit("tune_fifo_sweep_after_ray_start_vs_direct", fifo_wall - fifo_ray, "s", direct_wall)
    emit("tune_overhead_per_trial", (fifo_wall - direct_wall) / trials, "s", direct_trial)
    emit("tune_stage_startup_seconds", fifo_ray, "s", fifo_wall)
    # Where the rest goes: a worker's first trial pays its imports; later ones reuse the worker.
    seen: set[int] = set()
    first, reused = [], []
    for pid, seconds in fifo_trials:
        (reused if pid in seen else first).append(seconds)
        seen.add(pid)
    if reused:
        emit("tune_trial_on_reused_worker_vs_direct", statistics.mean(reused), "s", direct_trial)
        emit("tune_worker_first_trial_vs_reused", statistics.mean(first), "s",
             statistics.mean(reused))  # fmt: skip
    in_trials = sum(seconds for _, seconds in fifo_trials)
    emit("tune_seconds_outside_trials_after_ray_start", fifo_wall - fifo_ray - in_trials, "s",
         fifo_wall - fifo_ray)  # fmt: skip
    emit("tune_workers", len(seen), "processes", trials)
    emit("asha_phases_trained_vs_fifo", asha["phasesTrained"], "phases", fifo["phasesTrained"])
    emit("asha_wall_vs_fifo", asha_wall, "s", fifo_wall)
    phase_saving = 1 - asha["phasesTrained"] / fifo["phasesTrained"]
    wall_saving = 1 - (asha_wall - asha_ray) / (fifo_wall - fifo_ray)
    emit("asha_wall_saving_after_ray_start_vs_phase_saving", wall_saving, "fraction",
         phase_saving)  # fmt: skip
    emit("asha_trials_stopped_early", asha["trialsStoppedEarly"], "trials", asha["trials"])
    emit("asha_best_valid_loss_vs_fifo", asha["bestMetric"], "loss", fifo["bestMetric"])
    if sorted(map(json.dumps, asha_params)) != sorted(map(json.dumps, params)):
        say("note: the ASHA sweep sampled other configurations than the FIFO one")


if __name__ == "__main__":
    main()
