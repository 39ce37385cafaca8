"""The tune stage's pure parts (``stages.sweep``): search-space checks and translation to Ray
Tune, applying the best parameters, trial bookkeeping, the trial table and the board's progress
record; and the stage's mapping of scheduler and search kinds to Ray's."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ulmfit_trainer.config import ClassifierStageSpec, SearchDomain, StageConfig, TuneSpec
from ulmfit_trainer.errors import InvalidSpec, PermanentError
from ulmfit_trainer.stages.sweep import (
    TrialRecord,
    apply_best_params,
    best_record,
    check_space,
    counts,
    error_line,
    finished_status,
    integer_fields,
    max_phases,
    search_space,
    trial_store_key,
    trial_table,
    with_params,
)
from ulmfit_trainer.store import CheckpointStore, open_store

from tests.harness.parts import require_modules

BASE = ClassifierStageSpec(unfreeze_phases=3, learning_rate=2e-3, batch_size=16)


def space(**domains: dict) -> TuneSpec:
    return TuneSpec(space={name: SearchDomain(**d) for name, d in domains.items()})


def test_integer_fields_are_the_classifiers_whole_number_settings() -> None:
    ints = integer_fields()
    assert {"unfreezePhases", "batchSize", "headHiddenSize"} <= ints
    assert not ints & {"learningRate", "dropout", "epochsPerPhase"}


def test_with_params_validates_like_the_job_spec_and_names_the_field() -> None:
    tuned = with_params(BASE, {"learningRate": 1e-3, "unfreezePhases": 2.0}, "x")
    assert tuned.learning_rate == 1e-3 and tuned.unfreeze_phases == 2
    assert tuned.batch_size == 16  # untouched settings stay
    with pytest.raises(InvalidSpec) as bad:
        with_params(BASE, {"dropout": 1.5}, "tune.bestParams")
    assert "tune.bestParams.dropout" in str(bad.value) and "1.5" in str(bad.value)
    with pytest.raises(InvalidSpec, match=r"x\.head: is not tunable"):
        with_params(BASE, {"head": "attention"}, "x")


@pytest.mark.parametrize(
    ("name", "domain", "field"),
    [
        ("dropout", {"type": "uniform", "low": 0.5, "high": 1.0}, "stages.tune.space.dropout"),
        ("learningRate", {"type": "choice", "values": [1e-3, 2.0]}, "learningRate"),
        ("batchSize", {"type": "int", "low": 1, "high": 8}, "stages.tune.space.batchSize"),
        ("unfreezePhases", {"type": "choice", "values": [2, 2.5]}, "unfreezePhases.values"),
        ("headHiddenSize", {"type": "uniform", "low": 3.2, "high": 3.7}, "headHiddenSize"),
    ],
)
def test_a_space_that_can_yield_a_bad_value_is_rejected_up_front(
    name: str, domain: dict, field: str
) -> None:
    with pytest.raises(InvalidSpec, match=field):
        check_space(space(**{name: domain}), BASE)


def test_pbt_with_optuna_is_rejected() -> None:
    spec = TuneSpec.model_validate(
        {"space": {"dropout": {"type": "uniform", "low": 0.0, "high": 0.5}},
         "scheduler": "pbt", "searchAlgorithm": "optuna"}
    )  # fmt: skip
    with pytest.raises(InvalidSpec, match=r"stages\.tune\.searchAlgorithm"):
        check_space(spec, BASE)


def test_search_space_samples_stay_in_bounds_with_the_right_types() -> None:
    require_modules("ray.tune")
    spec = space(
        learningRate={"type": "loguniform", "low": 1e-4, "high": 1e-2},
        dropout={"type": "uniform", "low": 0.1, "high": 0.3},
        unfreezePhases={"type": "int", "low": 1, "high": 3},
        batchSize={"type": "choice", "values": [8, 16]},
        headHiddenSize={"type": "loguniform", "low": 16, "high": 64},
    )
    check_space(spec, BASE)
    domains = search_space(spec)
    rng = random.Random(0)
    seen_phases = set()
    for _ in range(200):
        sample = {k: d.sample(random_state=rng.randrange(2**31)) for k, d in domains.items()}
        assert 1e-4 <= sample["learningRate"] <= 1e-2
        assert 0.1 <= sample["dropout"] <= 0.3
        assert isinstance(sample["unfreezePhases"], int) and 1 <= sample["unfreezePhases"] <= 3
        assert sample["batchSize"] in (8, 16) and isinstance(sample["batchSize"], int)
        assert isinstance(sample["headHiddenSize"], int) and 16 <= sample["headHiddenSize"] <= 64
        seen_phases.add(sample["unfreezePhases"])
        with_params(BASE, {k: getattr(v, "item", lambda v=v: v)() for k, v in sample.items()}, "")
    assert seen_phases == {1, 2, 3}  # `high` is inclusive


def test_asha_max_t_covers_the_longest_trial() -> None:
    assert max_phases(space(dropout={"type": "uniform", "low": 0, "high": 0.5}), BASE) == 3
    tuned = space(unfreezePhases={"type": "choice", "values": [2, 5, 4]})
    assert max_phases(tuned, BASE) == 5
    unset = ClassifierStageSpec()
    assert max_phases(space(dropout={"type": "uniform", "low": 0, "high": 0.5}), unset) == 100


def test_trial_store_key_is_stable_for_the_same_trial_and_parameters() -> None:
    a = trial_store_key("tune", "trial-3-ab12c_00003", {"learningRate": 0.001, "dropout": 0.2})
    b = trial_store_key("tune", "trial-3-ff00f_00003", {"dropout": 0.2, "learningRate": 0.001})
    c = trial_store_key("tune", "trial-3-ab12c_00003", {"learningRate": 0.002, "dropout": 0.2})
    assert a == b and a.startswith("tune-3-") and a != c


def _records() -> list[TrialRecord]:
    return [
        TrialRecord("trial-0-a", {"learningRate": 1e-3}, "completed", 0.61, 3, 3),
        TrialRecord("trial-1-b", {"learningRate": 1e-5}, "stopped", 0.20, 1, 3),
        TrialRecord("trial-2-c", {"learningRate": 1e-2}, "failed", None, 0, None, "boom"),
        TrialRecord("trial-3-d", {"learningRate": 3e-3}, "completed", 0.72, 3, 3),
    ]


def test_counts_and_best_trial() -> None:
    records = _records()
    totals = counts(records)
    assert totals["trials"] == 4 and totals["trialsCompleted"] == 2
    assert totals["trialsStoppedEarly"] == 1 and totals["trialsFailed"] == 1
    assert totals["phasesTrained"] == 7 and totals["phasesPlanned"] == 9
    assert best_record(records, "max").trial == "trial-3-d"
    assert best_record(records, "min").trial == "trial-1-b"
    assert best_record([records[2]], "max") is None


def test_finished_status_tells_completed_from_stopped() -> None:
    assert finished_status(TrialRecord("t", {}, phase=3, phases=3)) == "completed"
    assert finished_status(TrialRecord("t", {}, phase=1, phases=3)) == "stopped"
    assert finished_status(TrialRecord("t", {}, phase=0, phases=None)) == "pending"


def test_trial_table_lists_every_trial_with_its_params_and_metric() -> None:
    lines = trial_table(_records(), "validAccuracy")
    assert lines[0].split()[:4] == ["trial", "status", "phase", "validAccuracy"]
    assert len(lines) == 5
    assert "0.7200" in lines[4] and "learningRate=0.003" in lines[4] and "3/3" in lines[4]
    assert lines[3].split()[1:4] == ["failed", "0", "-"]


def test_error_line_keeps_the_exception_line_of_a_wrapped_traceback() -> None:
    text = (
        'ray::ImplicitFunc.train() (pid=1, ip=1.2.3.4)\n  File "x.py", line 3, in f\n'
        "    raise IndexError('index out of range in self')\n"
        "IndexError: index out of range in self\n"
    )
    assert error_line(text) == "IndexError: index out of range in self"
    assert error_line(None) == "unknown error"


def test_apply_best_params_reads_the_sweeps_final_checkpoint(tmp_path: Path) -> None:
    checkpoints = CheckpointStore(open_store(tmp_path), "ns/job")
    config = StageConfig(
        stage="classifier", run="ns/job", store_root=str(tmp_path), classifier=BASE,
        tuned_by="tune",
    )  # fmt: skip
    ctx = SimpleNamespace(config=config, checkpoints=checkpoints, stage="classifier")
    with pytest.raises(PermanentError, match="sweep 'tune', which has no final checkpoint"):
        apply_best_params(ctx, BASE)

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"trials": []}))
    best = {"learningRate": 4e-3, "unfreezePhases": 2}
    checkpoints.save("tune", "final", folder, {"bestParams": best}, final=True)
    tuned = apply_best_params(ctx, BASE)
    assert tuned.learning_rate == 4e-3 and tuned.unfreeze_phases == 2
    assert tuned.batch_size == BASE.batch_size

    checkpoints.save("tune", "final", folder, {"bestParams": {"dropout": 3.0}}, final=True)
    with pytest.raises(InvalidSpec, match=r"tune\.bestParams\.dropout"):
        apply_best_params(ctx, BASE)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("asha", "AsyncHyperBandScheduler"),
        ("median", "MedianStoppingRule"),
        ("pbt", "PopulationBasedTraining"),
        ("fifo", "FIFOScheduler"),
    ],
)
def test_each_scheduler_kind_maps_to_its_ray_scheduler(kind: str, expected: str) -> None:
    require_modules("ray.tune")
    from ulmfit_trainer.stages.tune import _scheduler

    spec = space(learningRate={"type": "loguniform", "low": 1e-4, "high": 1e-2}).model_copy(
        update={"scheduler": kind, "grace_period": 2}
    )
    scheduler = _scheduler(spec, BASE, search_space(spec))
    assert type(scheduler).__name__ == expected
    if kind == "asha":
        assert scheduler._max_t == 3  # BASE's phases: a trial at max_t has finished
    if kind == "pbt":
        assert set(scheduler._hyperparam_mutations) == {"learningRate"}


def test_search_algorithm_kinds() -> None:
    require_modules("ray.tune")
    from ulmfit_trainer.stages.tune import _searcher

    random_search = _searcher(space(dropout={"type": "uniform", "low": 0, "high": 0.5}), 7)
    assert type(random_search).__name__ == "BasicVariantGenerator"
    assert random_search.max_concurrent == 0  # as many trials as the CPUs hold
    # Tune drops its own limit for a generator like this one: it must carry the spec's.
    bounded = space(dropout={"type": "uniform", "low": 0, "high": 0.5}).model_copy(
        update={"concurrent_trials": 2}
    )
    assert _searcher(bounded, 7).max_concurrent == 2
    optuna_spec = TuneSpec.model_validate(
        {"space": {"dropout": {"type": "uniform", "low": 0, "high": 0.5}},
         "searchAlgorithm": "optuna"}
    )  # fmt: skip
    assert type(_searcher(optuna_spec, 7)).__name__ == "OptunaSearch"
    bounded_optuna = _searcher(optuna_spec.model_copy(update={"concurrent_trials": 2}), 7)
    assert type(bounded_optuna).__name__ == "ConcurrencyLimiter"
    assert bounded_optuna.max_concurrent == 2


def test_a_sweep_without_hub_backbones_starts_without_torch(tmp_path: Path) -> None:
    """The sweep's driver only schedules: torch is for trials, and importing it costs seconds
    at every sweep's start."""
    program = f"""
import sys
from ulmfit_trainer.config import ClassifierStageSpec, SearchDomain, StageConfig, TuneSpec
from ulmfit_trainer.stages.tune import _mirror_backbones
from ulmfit_trainer.store import CheckpointStore, open_store
config = StageConfig(
    stage="tune", run="r", store_root={str(tmp_path)!r}, classifier=ClassifierStageSpec(),
    tune=TuneSpec(space={{"dropout": SearchDomain(type="uniform", low=0.0, high=0.4)}}),
)
_mirror_backbones(config, CheckpointStore(open_store({str(tmp_path)!r}), "r"))
print("torch" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
