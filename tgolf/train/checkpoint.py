"""Checkpoints: a folder per save, written atomically, loadable with ``torch.load(weights_only=True)``.

Layout: ``<run>/checkpoints/step_<N>/model.pt`` (rank 0: model weights, their moving average if the run keeps
one, step, time, config) and
``rank_<r>.pt`` (each rank: its optimizer state — Muon's momentum buffers are sharded across ranks —,
its data-loader position and RNG state). ``<run>/checkpoints/latest`` names the newest complete one.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "tgolf-checkpoint-1"


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    step: int
    train_seconds: float
    config: dict[str, Any]
    world_size: int
    optimizers: list[dict]
    loader: dict[str, Any]
    rng: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None
    switch_steps: dict[str, int] = field(default_factory=dict)  # the step each training switch turned on at


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(root: Path, *, rank: int, world_size: int, step: int, train_seconds: float, config: dict,
         model_state: dict, optimizer_states: list[dict], loader_state: dict, barrier,
         ema_state: dict | None = None, switch_steps: dict[str, int] | None = None) -> Path:
    """Every rank calls this; ``barrier()`` separates the writes from publishing ``latest``."""
    folder = root / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _atomic_save({"format": FORMAT, "optimizers": optimizer_states, "loader": loader_state, "rng": rng},
                 folder / f"rank_{rank}.pt")
    if rank == 0:
        _atomic_save({"format": FORMAT, "model": model_state, "step": step, "train_seconds": train_seconds,
                      "config": config, "world_size": world_size, "ema": ema_state,
                      "switch_steps": dict(switch_steps or {})},
                     folder / "model.pt")
    barrier()
    if rank == 0:
        latest = root / "latest"
        tmp = root / "latest.tmp"
        tmp.write_text(folder.name + "\n")
        os.replace(tmp, latest)
        for old in sorted(root.glob("step_*"))[:-2]:  # keep the newest two (zero-padded names sort by step)
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return folder


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run/checkpoints folder whose ``latest`` names one."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "latest").is_file():
            return candidate / (candidate / "latest").read_text().strip()
    if (path / "model.pt").is_file():
        return path
    raise FileNotFoundError(f"--resume {path}: no checkpoint there (expected model.pt or a 'latest' file)")


def load(path: str | Path, rank: int, world_size: int, map_location: torch.device | str = "cpu") -> Checkpoint:
    folder = resolve(path)
    parts = {}
    for name in ("model.pt", f"rank_{rank}.pt"):
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {folder}: missing {name}")
        data = torch.load(file, map_location=map_location, weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"checkpoint file {file}: field 'format' is not {FORMAT!r}")
        parts[name] = data
    main, mine = parts["model.pt"], parts[f"rank_{rank}.pt"]
    if main["world_size"] != world_size:
        raise ValueError(f"checkpoint {folder}: saved with world_size={main['world_size']}, resuming with "
                         f"{world_size}; resume with the same number of processes")
    return Checkpoint(model=main["model"], step=main["step"], train_seconds=main["train_seconds"],
                      config=main["config"], world_size=world_size, optimizers=mine["optimizers"],
                      loader=mine["loader"], rng=mine["rng"], ema=main.get("ema"),
                      switch_steps=_switch_steps(main))


def _switch_steps(main: dict[str, Any]) -> dict[str, int]:
    """The steps the training switches turned on at; checkpoints from before switches had only late QAT's."""
    if "switch_steps" in main:
        return dict(main["switch_steps"])
    return {} if main.get("late_qat_step") is None else {"late_qat": main["late_qat_step"]}


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"].cpu())
