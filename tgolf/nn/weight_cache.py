"""Per-weight-update caches for drop-in linears that derive tensors from their latent weight (codes, scales,
dequantized copies): made once per weight update, not once per micro-batch.

The cache key is (global optimizer-step counter, ``weight._version``, storage address, dtype, device, the layer's
quantization settings):

* ``weight._version`` grows with every in-place change made through the parameter (``optimizer.step()`` under
  ``no_grad``, ``copy_``, ``load_state_dict``); the storage address changes when ``.to()``/``.cuda()`` swap it;
* a global hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) counts every ``step()`` of every
  torch optimizer, which also catches optimizers that write through ``p.data`` (no version bump there).
  Anything else that writes through ``weight.data`` must call ``invalidate()``.

A refresh allocates new tensors (never writes into old ones), so tensors saved by an earlier forward for its backward
stay intact. Under ``torch.compile`` no Python-side state can be trusted inside the graph, so the values are traced
into the graph and made every forward (one pass over the weight, small beside the GEMMs).
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["PerUpdateCache"]

T = TypeVar("T")
_optimizer_steps = 0


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


class PerUpdateCache:
    """Mixin for an ``nn.Linear`` subclass: ``_memo(slot, extra, make)`` keeps ``make()`` in the attribute ``slot``
    as ((key, extra), value) until the weight changes. ``CACHE_SLOTS`` names the slots; ``_cache_settings()`` the
    layer's settings that also key the cache."""

    CACHE_SLOTS: tuple[str, ...] = ()
    weight: torch.Tensor

    def _cache_settings(self) -> tuple:
        return ()

    def _cache_key(self) -> tuple | None:
        w = self.weight
        try:
            version = w._version
        except RuntimeError:  # inference-mode tensors have no version counter: never cache
            return None
        return (_optimizer_steps, version, w.data_ptr(), w.dtype, w.device, self._cache_settings())

    def invalidate(self) -> None:
        """Forget the cached values (after writing the weight through ``weight.data``)."""
        for slot in self.CACHE_SLOTS:
            setattr(self, slot, None)

    def _memo(self, slot: str, extra, make: Callable[[], T]) -> T:
        """``make()`` once per weight update (and per ``extra``); recomputed every call under torch.compile and for
        weights without a version counter."""
        if torch.compiler.is_compiling():
            return make()
        key = self._cache_key()
        cached = getattr(self, slot, None)
        if key is not None and cached is not None and cached[0] == (key, extra):
            return cached[1]
        with torch.no_grad():
            value = make()
        setattr(self, slot, None if key is None else ((key, extra), value))
        return value
