"""val_loss and val_bpb, exactly as the contest scores them (BRIEF §1).

The val stream has ``T = len(tokens) - 1`` targets (target j is token j+1, predicted from tokens 0..j). They are
scored in consecutive chunks, every target exactly once: the first chunk is a whole window of ``seq_len`` targets,
each later chunk the next ``stride`` targets, scored by a window of ``seq_len`` tokens that *ends* at the chunk, so
each target sees as much context as the window allows. ``stride=0`` means ``stride=seq_len``: plain non-overlapping
windows. Windows are shared out over ranks in contiguous blocks; the float64 sums are all-reduced.

Extending: a different scorer (e.g. stateful evaluation that carries a recurrent state across windows) passes its
own ``score_fn(model, x, y) -> per-token nats [B, T]`` or reuses ``plan_windows`` and ``Totals``.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from tgolf.data.tokenizer import ByteTables

ScoreFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    val_loss: float  # mean nats per scored token
    val_bpb: float  # bits per UTF-8 byte of the text the scored tokens stand for
    tokens: int
    bytes: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def token_bytes(prev_ids: torch.Tensor, ids: torch.Tensor, tables: ByteTables) -> torch.Tensor:
    """Bytes each target token in ``ids`` stands for, given the token before it (``prev_ids``, same shape); int64."""
    nbytes = tables.base_bytes[ids].to(torch.int64)
    return nbytes + (tables.has_leading_space[ids] & ~tables.is_boundary[prev_ids]).to(torch.int64)


def plan_windows(num_targets: int, seq_len: int, stride: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Window start offsets and how many of each window's last targets it scores (int64 arrays).

    Every window covers ``seq_len`` inputs ``tokens[s:s+seq_len]`` (fewer only when ``num_targets < seq_len``).
    """
    if seq_len <= 0 or num_targets <= 0:
        raise ValueError(f"need seq_len > 0 and at least one target, got seq_len={seq_len}, targets={num_targets}")
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride={stride} must lie in (0, seq_len={seq_len}]")
    first = min(seq_len, num_targets)
    ends = np.concatenate([[first], np.arange(first + stride, num_targets + stride, stride)])
    ends = np.minimum(ends, num_targets)
    ends = ends[np.concatenate([[True], np.diff(ends) > 0])]
    scored = np.diff(np.concatenate([[0], ends]))
    starts = np.maximum(ends - seq_len, 0)
    return starts.astype(np.int64), scored.astype(np.int64)


class Totals:
    """float64 sums kept on the device, so the loop never waits on the GPU; ``reduce`` all-reduces them."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll nats, tokens, bytes

    def add(self, nll: torch.Tensor, nbytes: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the per-token ``nll`` and ``nbytes`` where ``mask`` is true (all three the same shape)."""
        zero = torch.zeros((), dtype=torch.float64, device=nll.device)
        self.sums += torch.stack([torch.where(mask, nll.double(), zero).sum(), mask.sum().double(),
                                  torch.where(mask, nbytes.double(), zero).sum()])

    def reduce(self) -> "Totals":
        dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
        return self

    def result(self, seconds: float) -> EvalResult:
        nll, tokens, nbytes = self.sums.tolist()
        if tokens == 0 or nbytes == 0:
            raise ValueError(f"nothing scored ({tokens:.0f} tokens, {nbytes:.0f} bytes)")
        return EvalResult(val_loss=nll / tokens, val_bpb=nll / math.log(2) / nbytes,
                          tokens=int(tokens), bytes=int(nbytes), seconds=seconds)


def default_score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, y, reduction="none")


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPUs (as in training), nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def score_windows(model: torch.nn.Module, val_tokens: torch.Tensor, starts: np.ndarray, scored: np.ndarray,
                  window: int, per_batch: int, tables: ByteTables, device: torch.device, totals: Totals,
                  score_fn: ScoreFn = default_score) -> None:
    """Add to ``totals`` the last ``scored[i]`` targets of each window ``val_tokens[starts[i] : starts[i]+window+1]``,
    ``per_batch`` windows per forward (``tables`` already on ``device``); the model runs in eval mode, no grad."""
    offsets = torch.arange(window + 1)
    positions = offsets[1:].to(device)
    count = len(starts)
    was_training = model.training
    model.eval()
    try:
        # no_grad, not inference_mode: caches a model fills here (rotary tables) must stay usable in training
        with torch.no_grad(), autocast_for(device):
            for b in range(0, count, per_batch):
                # a short last batch is padded with copies scoring nothing, so compiled models see one shape
                rows = np.arange(b, b + per_batch).clip(max=count - 1)
                n = np.where(np.arange(b, b + per_batch) < count, scored[rows], 0)
                idx = (torch.from_numpy(starts[rows])[:, None] + offsets).to(val_tokens.device)
                seqs = val_tokens[idx].to(device=device, dtype=torch.int64, non_blocking=True)
                x, y = seqs[:, :-1], seqs[:, 1:]
                nll = score_fn(model, x, y).float()
                # window position p is scored iff it is among the last n: p + 1 > window - n
                n = torch.from_numpy(n).to(device, non_blocking=True)
                totals.add(nll, token_bytes(x, y, tables), positions > window - n[:, None])
    finally:
        model.train(was_training)


def rank_share(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi): this rank's contiguous share of ``count`` items (shares differ by at most one)."""
    return count * rank // world_size, count * (rank + 1) // world_size


def require_group(caller: str, world_size: int) -> None:
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{caller}(world_size={world_size}) needs an initialized torch.distributed group")


def evaluate(model: torch.nn.Module, val_tokens: torch.Tensor, seq_len: int, batch_tokens: int, tables: ByteTables,
             device: torch.device | str, rank: int = 0, world_size: int = 1, stride: int = 0,
             score_fn: ScoreFn = default_score) -> EvalResult:
    """Score ``val_tokens`` (1-D ints) with ``model``; ``batch_tokens`` is the global tokens per forward batch.

    Each rank scores its contiguous share of the windows; the result (same on every rank) covers all of them.
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    val_tokens = torch.as_tensor(val_tokens)
    starts, scored = plan_windows(val_tokens.numel() - 1, seq_len, stride)
    lo, hi = rank_share(len(starts), rank, world_size)
    window = min(seq_len, val_tokens.numel() - 1)
    per_batch = max(1, min(batch_tokens // (world_size * window), hi - lo))
    totals = Totals(device)
    score_windows(model, val_tokens, starts[lo:hi], scored[lo:hi], window, per_batch, tables.to(device), device,
                  totals, score_fn)
    if world_size > 1:
        require_group("evaluate", world_size)
        totals.reduce()
    return totals.result(time.perf_counter() - t0)
