"""Learning-rate multiplier keyed to elapsed training time, so the warmdown ends exactly at the budget.

The baseline's warmdown is given in steps (WARMDOWN_ITERS). With a wall-clock cap, tgolf converts it to
seconds with the measured mean step time: the multiplier is 1 until ``budget − warmdown_seconds`` and then
falls linearly to 0 at the budget, whatever the step time turns out to be. Without a cap it is step-keyed.
"""
from __future__ import annotations


def lr_scale(step: int, elapsed_s: float, mean_step_s: float, *, iterations: int, warmdown_iters: int,
             max_wallclock_s: float) -> float:
    if warmdown_iters <= 0:
        return 1.0
    if max_wallclock_s > 0:
        warmdown_s = warmdown_iters * mean_step_s
        remaining_s = max_wallclock_s - elapsed_s
        by_time = 1.0 if warmdown_s <= 0 or remaining_s >= warmdown_s else max(remaining_s / warmdown_s, 0.0)
    else:
        by_time = 1.0
    start = iterations - warmdown_iters
    by_step = 1.0 if step < start else max((iterations - step) / warmdown_iters, 0.0)
    return min(by_time, by_step)
