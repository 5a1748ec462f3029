"""Score-first test-time training (TTT): adapt the model to the validation stream while scoring it, legally.

The contest lets evaluation adapt to validation tokens only once they are scored. So the stream's targets are cut
into chunks of ``chunk_tokens``, and each chunk, in order, is first scored (with exactly the windows
``tgolf.eval.bpb.evaluate`` uses at this stride, without gradients), then trained on: ``epochs`` passes of SGD with
momentum over its tokens. Chunk c is therefore scored by the model adapted on chunks 0..c-1 only; the last chunk is
scored and never trained on. Every target is scored once, so with ``lr=0`` the result equals ``evaluate``'s.

The recipe and its defaults come from openai/parameter-golf PR #461, used by the 1.1194 record (PR #549): chunks of
32,768 tokens, SGD at lr 0.002 with momentum 0.9 decayed by a cosine over the chunks, 3 epochs, gradient norm clip
1.0, every block adapted. The record reports -0.0026 bpb for about 410 s of its 600 s evaluation on 8×H100.

Under torchrun each rank scores its share of a chunk's windows and trains on its share of the chunk's sequences;
gradients are summed over ranks and divided by the chunk's token count, so every rank applies the same update.
``max_seconds`` caps the whole call: adaptation stops (all ranks together) once the time measured so far says that
one more chunk's training plus scoring the chunks left would not fit; the remaining chunks are still scored.
The model is adapted in place.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from tgolf.data.tokenizer import ByteTables
from tgolf.train.distributed import any_rank
from tgolf.eval.bpb import (EvalResult, Totals, autocast_for, plan_windows, rank_share, require_group,
                            score_windows)


@dataclass(frozen=True)
class TTTSettings:
    """The ``ttt_*`` fields of tgolf.config.Config (their one home, with their defaults and meanings)."""

    chunk_tokens: int
    epochs: int
    lr: float
    momentum: float
    grad_clip: float
    freeze_blocks: int
    batch_seqs: int
    max_seconds: float

    @classmethod
    def from_config(cls, cfg: Any) -> "TTTSettings":
        return cls(**{f.name: getattr(cfg, "ttt_" + f.name) for f in dataclasses.fields(cls)})


@dataclass
class TTTResult(EvalResult):
    chunks: int = 0  # units of adaptation (``unit``): chunks of the stream, or documents (tgolf.eval.lora_ttt)
    adapted_chunks: int = 0  # units trained on (all chunks but the last, unless max_seconds stopped adaptation early)
    adapt_seconds: float = 0.0  # of ``seconds``, the time spent training
    chunk_bpb: list[float] = field(default_factory=list)  # val_bpb of each chunk, in stream order
    unit: str = "chunks"


@dataclass(frozen=True)
class Chunk:
    first_window: int
    end_window: int  # exclusive
    first_target: int
    end_target: int  # exclusive: the chunk scores targets first_target..end_target-1


def plan_chunks(starts: np.ndarray, scored: np.ndarray, window: int, chunk_tokens: int) -> list[Chunk]:
    """Group consecutive windows (from ``plan_windows``) by the chunk their first scored target falls in."""
    ends = starts + window
    firsts = ends - scored
    ids = firsts // chunk_tokens
    bounds = np.flatnonzero(np.diff(ids)) + 1
    lows, highs = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(ids)]])
    return [Chunk(int(lo), int(hi), int(firsts[lo]), int(ends[hi - 1])) for lo, hi in zip(lows, highs)]


def _frozen(model: torch.nn.Module, freeze_blocks: int) -> list[torch.nn.Parameter]:
    """The parameters of the first ``freeze_blocks`` blocks (which TTT leaves as they are)."""
    if not freeze_blocks:
        return []
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"ttt freeze_blocks={freeze_blocks}: the model has no `blocks` to freeze")
    return [p for block in blocks[:freeze_blocks] for p in block.parameters()]


def _all_reduce(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """In place: the sum over ranks."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _sync_gradients(params: list[torch.nn.Parameter], tokens: torch.Tensor, world_size: int) -> None:
    """Each gradient becomes its sum over ranks divided by the tokens summed over ranks, in one all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _all_reduce(torch.cat([g.reshape(-1).float() for g in grads] + [tokens.reshape(1).float()]), world_size)
    flat = flat[:-1] / flat[-1].clamp(min=1)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).to(p.dtype)


def _train_chunk(model: torch.nn.Module, val_tokens: torch.Tensor, chunk: Chunk, seq_len: int,
                 settings: TTTSettings, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 device: torch.device, rank: int, world_size: int) -> None:
    """``settings.epochs`` passes over the chunk's targets as sequences of ``seq_len``, ``batch_seqs`` a step."""
    span = chunk.end_target - chunk.first_target
    num_seqs = -(-span // seq_len)
    offsets = torch.arange(seq_len)
    model.train()
    for _ in range(settings.epochs):
        for first in range(0, num_seqs, settings.batch_seqs):
            count = min(settings.batch_seqs, num_seqs - first)
            lo, hi = rank_share(count, rank, world_size)
            rows = first + lo + torch.arange(-(-count // world_size))  # the same rows on every rank; extras masked
            targets = chunk.first_target + rows[:, None] * seq_len + offsets
            mask = (rows[:, None] < first + hi) & (targets < chunk.end_target)
            targets = targets.clamp(max=chunk.end_target - 1)
            x = val_tokens[targets].to(device=device, dtype=torch.int64, non_blocking=True)
            y = val_tokens[targets + 1].to(device=device, dtype=torch.int64, non_blocking=True)
            mask = mask.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast_for(device):
                nll = model(x, y, reduction="none").float()
            (nll * mask).sum().backward()
            _sync_gradients(params, mask.sum(), world_size)
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()


def evaluate_ttt(model: torch.nn.Module, val_tokens: torch.Tensor, seq_len: int, batch_tokens: int,
                 tables: ByteTables, device: torch.device | str, settings: TTTSettings, *, rank: int = 0,
                 world_size: int = 1, stride: int = 0, log: Callable[[str], None] | None = None) -> TTTResult:
    """Score ``val_tokens`` (1-D ints) chunk by chunk, training ``model`` (in place) on each chunk once scored.

    ``model(x, y, reduction="none")`` must give per-token nats [B, T] with gradients (the tgolf GPT does).
    ``seq_len``, ``batch_tokens`` and ``stride`` mean what they mean for ``evaluate``; training sequences are
    ``seq_len`` long. ``log`` (called on every rank, or on none) receives progress lines about ten times.
    """
    require_group("evaluate_ttt", world_size)
    device = torch.device(device)
    t0 = time.perf_counter()
    val_tokens = torch.as_tensor(val_tokens)
    num_targets = val_tokens.numel() - 1
    starts, scored = plan_windows(num_targets, seq_len, stride)
    window = min(seq_len, num_targets)
    chunks = plan_chunks(starts, scored, window, settings.chunk_tokens)
    widest = max(-(-(c.end_window - c.first_window) // world_size) for c in chunks)
    per_batch = max(1, min(batch_tokens // (world_size * window), widest))
    tables = tables.to(device)
    frozen = _frozen(model, settings.freeze_blocks)
    frozen_ids = {id(p): p.requires_grad for p in frozen}
    params = [p for p in model.parameters() if id(p) not in frozen_ids]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    chunk_sums = torch.zeros(len(chunks), 3, dtype=torch.float64, device=device)
    trained_chunks = len(chunks) - 1  # the last chunk is scored, never trained on
    adapting = settings.epochs > 0 and settings.lr > 0
    adapted, adapt_seconds, score_seconds = 0, 0.0, 0.0
    was_training = model.training
    for p in frozen:
        p.requires_grad_(False)
    try:
        for index, chunk in enumerate(chunks):
            started = time.perf_counter()
            lo, hi = rank_share(chunk.end_window - chunk.first_window, rank, world_size)
            lo, hi = chunk.first_window + lo, chunk.first_window + hi
            totals = Totals(device)
            score_windows(model, val_tokens, starts[lo:hi], scored[lo:hi], window, per_batch, tables, device, totals)
            chunk_sums[index] = totals.sums
            if adapting and index < trained_chunks and settings.max_seconds > 0:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the times measured must include the queued GPU work
                score_seconds += time.perf_counter() - started
                adapting = not _out_of_time(time.perf_counter() - t0, score_seconds / (index + 1),
                                            adapt_seconds / adapted if adapted else 0.0, len(chunks) - index - 1,
                                            settings.max_seconds, device, world_size)
            if adapting and index < trained_chunks:
                begun = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * index / trained_chunks))
                _train_chunk(model, val_tokens, chunk, window, settings, optimizer, params, device, rank,
                             world_size)
                adapted += 1
                if device.type == "cuda" and settings.max_seconds > 0:
                    torch.cuda.synchronize(device)
                adapt_seconds += time.perf_counter() - begun
            if log is not None and (index + 1) % max(1, len(chunks) // 10) == 0:
                log(_progress(chunk_sums[: index + 1].sum(0), index + 1, len(chunks), adapted,
                              time.perf_counter() - t0, world_size))
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(frozen_ids[id(p)])
        model.train(was_training)
    _all_reduce(chunk_sums, world_size)
    total = Totals(device)
    total.sums = chunk_sums.sum(0)
    nll, _, nbytes = chunk_sums.T.tolist()
    base = total.result(time.perf_counter() - t0)
    return TTTResult(**dataclasses.asdict(base), chunks=len(chunks), adapted_chunks=adapted,
                     adapt_seconds=adapt_seconds,
                     chunk_bpb=[n / math.log(2) / b if b else float("nan") for n, b in zip(nll, nbytes)])


def evaluate_configured_ttt(cfg: Any, model: torch.nn.Module, val_tokens: torch.Tensor, seq_len: int,
                            batch_tokens: int, tables: ByteTables, device: torch.device | str, *, rank: int = 0,
                            world_size: int = 1, stride: int = 0,
                            log: Callable[[str], None] | None = None) -> TTTResult:
    """Score-first TTT as ``cfg.ttt_mode`` says: "full" (``evaluate_ttt``, the ``ttt_*`` settings; ``stride`` and
    ``batch_tokens`` as for ``evaluate``) or "lora" (per-document adapters, tgolf.eval.lora_ttt, its own
    windows)."""
    if cfg.ttt_mode == "lora":
        from tgolf.eval.lora_ttt import LoRASettings, evaluate_lora_ttt

        return evaluate_lora_ttt(model, val_tokens, seq_len, tables, device, LoRASettings.from_config(cfg),
                                 rank=rank, world_size=world_size, seed=cfg.seed, log=log)
    return evaluate_ttt(model, val_tokens, seq_len, batch_tokens, tables, device, TTTSettings.from_config(cfg),
                        rank=rank, world_size=world_size, stride=stride, log=log)


def _out_of_time(elapsed: float, mean_score: float, mean_adapt: float, chunks_left: int, max_seconds: float,
                 device: torch.device, world_size: int) -> bool:
    """Whether training on the current chunk, then scoring the ``chunks_left`` after it, would overrun
    ``max_seconds``, judged from the mean times so far; a rank out of time stops them all."""
    late = elapsed + mean_adapt + mean_score * chunks_left > max_seconds
    return any_rank([late], device)[0] if world_size > 1 else late


def _progress(sums: torch.Tensor, done: int, total: int, adapted: int, seconds: float, world_size: int) -> str:
    """A progress line with the running val_bpb over all ranks."""
    nll, _, nbytes = _all_reduce(sums, world_size).tolist()
    return (f"ttt chunk {done}/{total}: running val_bpb {nll / math.log(2) / max(nbytes, 1):.4f}, "
            f"{adapted} chunks adapted, {seconds:.0f}s")


__all__ = ["TTTSettings", "TTTResult", "Chunk", "plan_chunks", "evaluate_ttt", "evaluate_configured_ttt"]
