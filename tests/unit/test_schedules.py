"""ULMFiT schedules: exact values from the paper's formulas."""

from __future__ import annotations

import pytest
from ulmfit_trainer.schedules import discriminative_lrs, stlr, total_steps, unfreeze_plan


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 1 / 32),  # starts at lr_max / ratio
        (5, (1 + 0.5 * 31) / 32),  # halfway up the warm-up
        (10, 1.0),  # the peak sits at cut = floor(100 * 0.1)
        (55, (1 + 0.5 * 31) / 32),  # halfway down: p = 1 - 45 / (10 * 9)
        (100, 1 / 32),  # back to the floor at T
        (250, 1 / 32),  # past the end: clamped, never negative
    ],
)
def test_stlr_follows_equation_3(step: int, expected: float) -> None:
    assert stlr(step, 100, cut_frac=0.1, ratio=32) == pytest.approx(expected, abs=1e-12)


def test_stlr_ratio_and_cut_frac() -> None:
    # T=40, cut_frac=0.25 -> cut=10; ratio 10.
    assert stlr(0, 40, cut_frac=0.25, ratio=10) == pytest.approx(0.1)
    assert stlr(10, 40, cut_frac=0.25, ratio=10) == pytest.approx(1.0)
    # p = 1 - 20 / (10 * 3) = 1/3 -> (1 + 3) / 10
    assert stlr(30, 40, cut_frac=0.25, ratio=10) == pytest.approx(0.4)
    assert stlr(7, 40, cut_frac=0.25, ratio=1) == pytest.approx(1.0)  # ratio 1: constant


def test_stlr_tiny_runs_still_warm_up_and_decay() -> None:
    # T=5 would give cut = 0; one warm-up step keeps the triangle.
    values = [stlr(t, 5) for t in range(6)]
    assert values[0] == pytest.approx(1 / 32)
    assert values[1] == pytest.approx(1.0)
    assert values == sorted(values[:2]) + sorted(values[2:], reverse=True)
    assert min(values) >= 1 / 32


def test_stlr_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        stlr(0, 0)
    with pytest.raises(ValueError):
        stlr(0, 10, cut_frac=1.0)
    with pytest.raises(ValueError):
        stlr(0, 10, ratio=0.5)


def test_discriminative_lrs_divide_by_factor_per_group_down() -> None:
    assert discriminative_lrs(1e-2, 4, factor=2.6) == pytest.approx(
        [1e-2 / 2.6**3, 1e-2 / 2.6**2, 1e-2 / 2.6, 1e-2]
    )
    assert discriminative_lrs(0.5, 1) == [0.5]
    assert discriminative_lrs(0.5, 3, factor=1.0) == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError):
        discriminative_lrs(0.5, 0)


def test_unfreeze_plan() -> None:
    assert unfreeze_plan(4) == [1, 2, 3, 4]
    assert unfreeze_plan(6, 3) == [1, 2, 6]  # the last phase trains everything
    assert unfreeze_plan(6, 2) == [1, 6]
    assert unfreeze_plan(6, 1) == [6]
    assert unfreeze_plan(3, 5) == [1, 2, 3, 3, 3]
    assert unfreeze_plan(1) == [1]
    with pytest.raises(ValueError):
        unfreeze_plan(0)
    with pytest.raises(ValueError):
        unfreeze_plan(3, 0)


def test_total_steps() -> None:
    assert total_steps(batches=100, epochs=1.0, accumulation=1, max_steps=None) == 100
    assert total_steps(batches=100, epochs=1.5, accumulation=4, max_steps=None) == 38
    assert total_steps(batches=100, epochs=3, accumulation=1, max_steps=50) == 50
    assert total_steps(batches=1, epochs=0.01, accumulation=8, max_steps=None) == 1
