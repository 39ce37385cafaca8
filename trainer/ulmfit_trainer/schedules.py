"""ULMFiT's schedules as pure functions: slanted triangular rates, discriminative rates, unfreezing.

Howard & Ruder, "Universal Language Model Fine-tuning for Text Classification" (2018), §3.2-3.3.
Nothing here touches torch: the engine turns these numbers into optimizer param groups and a
``LambdaLR``, and the tests pin the exact values.
"""

from __future__ import annotations

import math


def stlr(step: int, total_steps: int, cut_frac: float = 0.1, ratio: float = 32.0) -> float:
    """Slanted triangular learning-rate multiplier for optimizer step ``step`` (0-based).

    Eq. 3 of the paper: a short linear warm-up from ``1/ratio`` to 1 over the first
    ``cut = floor(T * cut_frac)`` steps, then a long linear decay back to ``1/ratio`` at ``T``.
    Multiply by a group's peak rate to get its rate.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 < cut_frac < 1.0:
        raise ValueError(f"cut_frac must be in (0, 1), got {cut_frac}")
    if ratio < 1.0:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    # A run shorter than 1/cut_frac steps would get cut = 0 and divide by zero; one warm-up
    # step keeps the shape (start low, peak, decay) for tiny runs.
    cut = max(1, math.floor(total_steps * cut_frac))
    t = min(max(step, 0), total_steps)
    p = t / cut if t < cut else 1.0 - (t - cut) / (cut * (1.0 / cut_frac - 1.0))
    # floor() makes cut * (1/cut_frac - 1) differ from T - cut by a fraction of a step; clamp so
    # the last steps never dip below 1/ratio.
    p = min(max(p, 0.0), 1.0)
    return (1.0 + p * (ratio - 1.0)) / ratio


def discriminative_lrs(peak: float, n_groups: int, factor: float = 2.6) -> list[float]:
    """Peak rate per layer group, ordered bottom -> top (the order of ``models.layer_groups``).

    The top group gets ``peak``; each group below gets the rate of the one above divided by
    ``factor`` (the paper's eta^{l-1} = eta^l / 2.6): lower layers hold more general features and
    should move less.
    """
    if n_groups < 1:
        raise ValueError(f"n_groups must be at least 1, got {n_groups}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    return [peak / factor ** (n_groups - 1 - i) for i in range(n_groups)]


def unfreeze_plan(n_groups: int, phases: int | None = None) -> list[int]:
    """How many layer groups, counted from the top, train in each gradual-unfreezing phase.

    Phase 1 trains the top group (the classifier head) only, each later phase unfreezes one more
    group, and the last phase always trains every group. ``phases`` defaults to ``n_groups`` (one
    phase per group). With fewer phases than groups the last phase jumps straight to all groups;
    with more, the extra phases keep training everything.
    """
    if n_groups < 1:
        raise ValueError(f"n_groups must be at least 1, got {n_groups}")
    if phases is None:
        phases = n_groups
    if phases < 1:
        raise ValueError(f"phases must be at least 1, got {phases}")
    plan = [min(k, n_groups) for k in range(1, phases + 1)]
    plan[-1] = n_groups
    return plan


def total_steps(batches: int, epochs: float, accumulation: int, max_steps: int | None) -> int:
    """Optimizer steps for ``epochs`` passes over ``batches`` micro batches per rank (>= 1)."""
    steps = math.ceil(batches * epochs / accumulation)
    if max_steps is not None:
        steps = min(steps, max_steps)
    return max(1, steps)
