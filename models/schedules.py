"""Per-step schedules (lr, weight decay, EMA momentum, temperatures) as plain numpy arrays."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """Per-step values, as DINO's `cosine_scheduler` (float64, length `total_steps`).

    Linear warm-up `start_warmup → base` over `warmup_steps` (np.linspace, so step
    `warmup_steps − 1` is exactly `base`), then `final + ½(base − final)(1 + cos(π t / T))` for
    t = 0 … T−1, T = total_steps − warmup_steps: starts at `base` and, like the reference, ends one
    step short of `final`.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    warmup = np.linspace(start_warmup, base, warmup_steps) if warmup_steps > 0 else np.array([])
    iters = np.arange(total_steps - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine)).astype(np.float64)
    assert len(schedule) == total_steps
    return schedule


def warmup_then_constant(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then ``end`` (DINO's teacher temperature)."""
    warmup_steps = min(int(warmup_steps), total_steps)
    return np.concatenate([np.linspace(start, end, warmup_steps), np.full(total_steps - warmup_steps, end)])
