"""Changes of the model's forward that happen once, part-way through training.

- **Late QAT** (``late_qat_threshold``): plain matrices until the learning-rate scale falls below the threshold,
  quantized ones from then on.
- **Depth recurrence** (``recur_layers`` with ``recur_start`` > 0): each layer once until that fraction of training
  is done, then ``recur_layers`` loop ``recur_passes`` times (the records turn it on at 0.35).

Each switch is off until it is due, then on for good, at the same step on every rank (they share the clock). The
compile warm-up runs every combination of the switches still off, so that no switch recompiles inside the timed
run; checkpoints keep the step each switched at.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from tgolf.config import Config


@dataclass
class Switch:
    name: str  # key of the step it switched at, in TrainResult.switch_steps and checkpoints
    set: Callable[[bool], object]  # turns it on (True) or off on the model
    due: Callable[[float, float], bool]  # (learning-rate scale, fraction of training done) → switch on now?
    reason: Callable[[float, float], str]  # the same arguments → what the log says when it switches
    on_at_end: bool = False  # switch on when training ends before it was due (the artifact's model has it on)


def training_switches(cfg: Config, model: nn.Module) -> list[Switch]:
    """The switches ``cfg`` asks for, each set off on ``model``; ValueError when the model cannot take one."""
    switches = []
    if cfg.late_qat_threshold > 0:
        from tgolf.nn.quant import set_qat_active  # only runs with QAT layers import it (code bytes)

        set_qat = functools.partial(set_qat_active, model)
        if not set_qat(False):
            raise ValueError(f"config field late_qat_threshold={cfg.late_qat_threshold} needs QAT layers "
                             f"(linear=qat4..qat8), and the model has none (linear={cfg.linear})")
        switches.append(Switch(
            "late_qat", set_qat, due=lambda scale, done: scale < cfg.late_qat_threshold,
            reason=lambda scale, done: f"late QAT: quantization on (lr scale {scale:.3f} < {cfg.late_qat_threshold})"))
    if cfg.recur_range() and cfg.recur_start > 0:
        looped = cfg.recur_range()
        model.set_recurrence(False)
        switches.append(Switch(
            "recurrence", model.set_recurrence, due=lambda scale, done: done >= cfg.recur_start,
            reason=lambda scale, done: f"recurrence: layers {looped[0]}-{looped[-1]} run {cfg.recur_passes} times "
                                       f"({done:.1%} of training done >= recur_start {cfg.recur_start})",
            on_at_end=True))
    return switches


def warmup_combinations(switches: list[Switch], steps: int) -> list[tuple[bool, ...]]:
    """For each of ``steps`` warm-up steps, the on/off state of each switch: every combination in turn (all off
    first), so that each of the graphs the run may reach is compiled before the clock starts (with fewer steps
    than combinations, the later ones are left out)."""
    combos = list(itertools.product((False, True), repeat=len(switches)))
    return [combos[i * len(combos) // steps] for i in range(steps)]
