"""Learning-rate multiplier keyed to elapsed training time, so the warmdown ends exactly at the budget.

The baseline's warmdown is given in steps (WARMDOWN_ITERS). With a wall-clock cap, tgolf converts it to
seconds with the measured mean step time: the multiplier is 1 until ``budget − warmdown_seconds`` and then
falls linearly to 0 at the budget, whatever the step time turns out to be. Without a cap it is step-keyed.

The later records give it as a fraction instead (WARMDOWN_FRAC, 0.72 in the 1.0810 stack): the multiplier falls
linearly over the last ``warmdown_frac`` of the training fraction (of the budget's time, else of the steps), and
MIN_LR (``min_lr``) floors it, under either form.
"""
from __future__ import annotations


def training_fraction(step: int, elapsed_s: float, *, iterations: int, budget_s: float) -> float:
    """How much of training is done: of the time budget with a cap, else of the steps."""
    return elapsed_s / budget_s if budget_s > 0 else step / iterations


def lr_scale(step: int, elapsed_s: float, mean_step_s: float, *, iterations: int, warmdown_iters: int,
             max_wallclock_s: float, warmdown_frac: float = 0.0, min_lr: float = 0.0) -> float:
    if warmdown_frac > 0:
        done = training_fraction(step, elapsed_s, iterations=iterations, budget_s=max_wallclock_s)
        return max(min(1.0, (1.0 - done) / warmdown_frac), min_lr)
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
    return max(min(by_time, by_step), min_lr)
