"""Where each op's implementation is chosen: CUDA extension → Triton → PyTorch reference.

Every op family asks this module instead of probing on its own, so the choice (and the reason for it)
is made in one place and reported by ``python -m tgolf.info``.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("cuda", "triton", "reference")


@dataclass(frozen=True)
class Choice:
    backend: str  # one of BACKENDS
    reason: str


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Probed once per process. A plain dict rather than functools.lru_cache: Dynamo traces dict lookups
# inside compiled regions without the warning it gives for lru_cache-wrapped functions.
_PROBES: dict[str, object] = {}


def fix_triton_interpreter() -> None:
    """Let the CPU interpreter of Triton 3.6 (and older) run loops with runtime bounds under NumPy >= 2.4.

    Those Triton versions convert a loop bound (a one-element 1-D array in the interpreter) with ``int(array)``,
    which NumPy 2.4 made an error (triton issue 9171, fixed upstream by triton PR 9172). Re-defining the same
    conversion through ``item()`` changes nothing else. Only the interpreter of Triton < 3.8 is touched.
    """
    if not triton_interpret() or "interpreter_index" in _PROBES:
        return
    _PROBES["interpreter_index"] = True
    import triton
    from triton.runtime import interpreter

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 8):  # fixed there: touch nothing
        return

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:  # a Triton whose interpreter is laid out differently: leave it alone
        return

    def _patch_lang_tensor(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


def triton_importable() -> bool:
    if "triton" not in _PROBES:
        try:
            import triton  # noqa: F401
        except ImportError:
            _PROBES["triton"] = False
        else:
            _PROBES["triton"] = True
    return bool(_PROBES["triton"])


def cuda_extension():
    """The compiled ``tgolf._C`` module, or None when it was not built (see tgolf_build.py)."""
    if "cuda_ext" not in _PROBES:
        try:
            _PROBES["cuda_ext"] = importlib.import_module("tgolf._C")
        except ImportError:
            _PROBES["cuda_ext"] = None
    return _PROBES["cuda_ext"]


def cuda_op(name: str) -> Callable | None:
    """``torch.ops.tgolf.<name>`` when the CUDA extension registered it, else None."""
    if cuda_extension() is None:
        return None
    return getattr(torch.ops.tgolf, name, None) if hasattr(torch.ops, "tgolf") else None


def forced_backend() -> str | None:
    """TGOLF_BACKEND=reference|triton|cuda forces a backend for every op (debugging and benchmarks)."""
    value = os.environ.get("TGOLF_BACKEND", "").strip().lower()
    if value and value not in BACKENDS:
        raise ValueError(f"environment variable TGOLF_BACKEND={value!r}: expected one of {BACKENDS}")
    return value or None


def choose(device: torch.device, cuda_name: str | None = None, has_triton: bool = True) -> Choice:
    """Pick the backend for an op on tensors living on ``device``.

    ``cuda_name`` is the op's name under ``torch.ops.tgolf`` if a CUDA kernel exists for it;
    ``has_triton`` says whether the family has a Triton kernel for this op.
    """
    # Memoized on everything the choice reads that can change while a process runs (the two environment
    # variables): ops ask on every call, and the uncached choice cost ~2 µs of host time per ask on a CPU.
    key = (device.type, cuda_name, has_triton, os.environ.get("TGOLF_BACKEND"), os.environ.get("TRITON_INTERPRET"))
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _CHOICES[key] = _choose(device, cuda_name, has_triton)
    return choice


_CHOICES: dict[tuple, Choice] = {}


def _choose(device: torch.device, cuda_name: str | None, has_triton: bool) -> Choice:
    forced = forced_backend()
    choice = _available(device, cuda_name, has_triton, forced)
    if forced is not None and choice.backend != forced:  # say so rather than fall back silently
        return Choice(choice.backend, f"TGOLF_BACKEND={forced} is not available for this op here; {choice.reason}")
    return choice


def _available(device: torch.device, cuda_name: str | None, has_triton: bool, forced: str | None) -> Choice:
    if device.type == "cuda":
        if forced in (None, "cuda") and cuda_name and cuda_op(cuda_name) is not None:
            return Choice("cuda", f"CUDA kernel torch.ops.tgolf.{cuda_name}")
        if forced in (None, "cuda", "triton") and has_triton and triton_importable():
            return Choice("triton", "Triton kernel on the GPU")
        return Choice("reference", "forced by TGOLF_BACKEND" if forced == "reference" else "no kernel available")
    if forced in (None, "triton", "cuda") and has_triton and triton_importable() and triton_interpret():
        return Choice("triton", "Triton kernel under TRITON_INTERPRET=1 on the CPU")
    if forced == "reference":
        return Choice("reference", "forced by TGOLF_BACKEND")
    return Choice("reference", "CPU tensors: PyTorch reference (set TRITON_INTERPRET=1 to run Triton on the CPU)")


# Registered by each op family: name -> function(device) -> Choice, for `python -m tgolf.info`.
OP_CHOICES: dict[str, Callable[[torch.device], Choice]] = {}


def register_op(name: str, chooser: Callable[[torch.device], Choice]) -> None:
    OP_CHOICES[name] = chooser
