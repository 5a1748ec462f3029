"""Per-document score-first test-time training with LoRA adapters (``ttt_mode="lora"``).

The recipe of the 1.195 record (openai/parameter-golf PR #77: the baseline's model, document masking, LoRA
adaptation at evaluation); later records, the best one (1.0611) included, adapt LoRA at test time too.

The validation stream is cut into documents at its BOS tokens. A document's targets are the tokens that follow
each of its positions, the last of them the next document's BOS, so the stream's targets are each scored exactly
once, as ``tgolf.eval.bpb.evaluate`` scores them. Documents go in batches of ``docs`` of similar lengths, each
document with fresh adapters of its own: rank-``rank`` deltas on every block's query and value projections and on
the output head, B = 0 at the start (no effect), A random. A document's targets are taken ``chunk`` at a time, in
order; each chunk is scored first, with the ``seq_len`` tokens before it inside the document as context (never
another document's), and then, unless it is the document's last chunk, the adapters take one Adam step on that
chunk's mean loss. The adapters are dropped after their batch, so no document learns from another.

Under torchrun the documents are dealt to the ranks in order of length; each rank adapts its own, and only the
totals are summed at the end. ``max_seconds`` bounds a rank's call: adaptation stops, for the documents left,
once adapting them at the rate measured so far would not fit; they are still scored, by the model as it is.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tgolf.data.tokenizer import BOS_ID, ByteTables
from tgolf.eval.bpb import Totals, autocast_for, require_group, token_bytes
from tgolf.eval.ttt import TTTResult


@dataclass(frozen=True)
class LoRASettings:
    """The ``ttt_lora_*`` fields of tgolf.config.Config, with ``ttt_max_seconds``."""

    rank: int
    lr: float
    chunk: int
    docs: int
    max_seconds: float

    @classmethod
    def from_config(cls, cfg: Any) -> "LoRASettings":
        return cls(rank=cfg.ttt_lora_rank, lr=cfg.ttt_lora_lr, chunk=cfg.ttt_lora_chunk, docs=cfg.ttt_lora_docs,
                   max_seconds=cfg.ttt_max_seconds)


def split_documents(val_tokens: torch.Tensor) -> np.ndarray:
    """Start positions of the stream's documents (each BOS; position 0 too when the stream starts inside one),
    followed by the last position, N − 1: document d holds the inputs ``starts[d] .. starts[d+1] − 1``."""
    tokens = val_tokens.numpy() if isinstance(val_tokens, torch.Tensor) else np.asarray(val_tokens)
    last = len(tokens) - 1
    starts = np.flatnonzero(tokens[:last] == BOS_ID)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return np.concatenate([starts, [last]]).astype(np.int64)


class _Adapters(nn.Module):
    """Low-rank deltas, one per document of a batch, for a layer of ``fan_in`` → ``fan_out``:
    Δy_d = (x_d A_dᵀ) B_dᵀ, B [docs, fan_out, rank] = 0 and A [docs, rank, fan_in] the same N(0, 1/fan_in) draw
    for every document, so that a document's adaptation does not depend on the batch it is in."""

    def __init__(self, docs: int, rank: int, fan_in: int, fan_out: int, device: torch.device,
                 generator: torch.Generator):
        super().__init__()
        a = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
        self.a = nn.Parameter(a.to(device).expand(docs, rank, fan_in).clone())
        self.b = nn.Parameter(torch.zeros(docs, fan_out, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, T, fan_in] for the batch's first n documents (those still running) → Δy [n, T, fan_out]."""
        a, b = self.a[: x.shape[0]].to(x.dtype), self.b[: x.shape[0]].to(x.dtype)
        return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


class _BatchLoRA:
    """Adapters on every block's c_q and c_v (through forward hooks) and on the head, for one batch of
    documents; a forward over fewer rows than the batch holds its first documents."""

    def __init__(self, model: nn.Module, docs: int, rank: int, device: torch.device, seed: int):
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
        self.layers: list[tuple[nn.Module, _Adapters]] = []
        for block in model.blocks:
            for layer in (block.attn.c_q, block.attn.c_v):
                fan_out, fan_in = layer.weight.shape
                self.layers.append((layer, _Adapters(docs, rank, fan_in, fan_out, device, generator)))
        vocab, dim = model.head_weight.shape
        self.head = _Adapters(docs, rank, dim, vocab, device, generator)
        self.handles = [layer.register_forward_hook(self._hook(adapters)) for layer, adapters in self.layers]

    def _hook(self, adapters: _Adapters):
        def add_delta(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output + adapters(inputs[0]).to(output.dtype)
        return add_delta

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, adapters in self.layers for p in adapters.parameters()] + list(self.head.parameters())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _per_token_nll(model: nn.Module, lora: _BatchLoRA | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Nats of each target [n, T], through ``lora``'s adapters when given (the head's delta included)."""
    if lora is None:
        return model(x, y, reduction="none").float()
    hidden = model.hidden_states(x)
    logits = F.linear(hidden, model.head_weight.to(hidden.dtype)) + lora.head(hidden).to(hidden.dtype)
    logits = logits.float()
    cap = model.config.logit_softcap
    if cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def _run_batch(model: nn.Module, val_tokens: torch.Tensor, starts: np.ndarray, lengths: np.ndarray,
               seq_len: int, settings: LoRASettings, tables: ByteTables, device: torch.device, totals: Totals,
               adapt: bool, seed: int) -> None:
    """Score (and with ``adapt``, adapt to) one batch of documents: inputs ``starts[i]`` .. + ``lengths[i]`` − 1,
    lengths in descending order."""
    chunk = settings.chunk
    lora = _BatchLoRA(model, len(starts), settings.rank, device, seed) if adapt else None
    optimizer = torch.optim.Adam(lora.parameters(), lr=settings.lr, betas=(0.9, 0.95)) if adapt else None
    start_t, length_t = torch.from_numpy(starts), torch.from_numpy(lengths)
    try:
        for c in range(-(-int(lengths[0]) // chunk)):
            active = int((lengths > c * chunk).sum())  # lengths descend: the first `active` documents
            hi = torch.clamp(length_t[:active], max=(c + 1) * chunk)
            lo = torch.clamp(hi - seq_len, min=0)
            width = int((hi - lo).max())
            offsets = torch.arange(width)
            positions = start_t[:active, None] + lo[:, None] + offsets  # inputs; targets are the next tokens
            inside = offsets < (hi - lo)[:, None]
            scored = inside & (lo[:, None] + offsets >= c * chunk)
            positions = torch.minimum(positions, (start_t[:active] + length_t[:active] - 1)[:, None])
            x = val_tokens[positions].to(device=device, dtype=torch.int64, non_blocking=True)
            y = val_tokens[positions + 1].to(device=device, dtype=torch.int64, non_blocking=True)
            scored = scored.to(device, non_blocking=True)
            more = length_t[:active] > (c + 1) * chunk  # documents with a chunk after this one
            train = adapt and bool(more.any())
            with torch.set_grad_enabled(train), autocast_for(device):
                nll = _per_token_nll(model, lora, x, y)
            totals.add(nll.detach(), token_bytes(x, y, tables), scored)
            if train:  # one step on each unfinished document's mean loss over this chunk
                weights = (scored & more.to(device)[:, None]).float()
                loss = (nll * weights).sum(1) / weights.sum(1).clamp(min=1)
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()
                optimizer.step()
    finally:
        if lora is not None:
            lora.remove()


def evaluate_lora_ttt(model: nn.Module, val_tokens: torch.Tensor, seq_len: int, tables: ByteTables,
                      device: torch.device | str, settings: LoRASettings, *, rank: int = 0, world_size: int = 1,
                      seed: int = 0, log: Callable[[str], None] | None = None) -> TTTResult:
    """Score ``val_tokens`` (1-D ints) document by document with per-document LoRA adaptation (module docstring).
    ``model`` is the tgolf GPT (``hidden_states``, ``head_weight``, ``blocks[i].attn.c_q/c_v``); it is left as it
    was. ``result.chunks`` counts documents, ``adapted_chunks`` those adapted to (over all ranks)."""
    require_group("evaluate_lora_ttt", world_size)
    if settings.chunk > seq_len:
        raise ValueError(f"ttt_lora_chunk={settings.chunk} is longer than the evaluation's seq_len={seq_len}: a "
                         "chunk must fit in its window")
    device = torch.device(device)
    t0 = time.perf_counter()
    val_tokens = torch.as_tensor(val_tokens)
    bounds = split_documents(val_tokens)
    lengths = np.diff(bounds)
    order = np.argsort(-lengths, kind="stable")[rank::world_size]  # dealt in order of length
    tables = tables.to(device)
    totals = Totals(device)
    adapting = settings.lr > 0 and settings.rank > 0
    adapted = adapted_targets = 0
    adapt_seconds = 0.0
    was_training = model.training
    frozen = {p: p.requires_grad for p in model.parameters()}
    model.eval()  # no dropout or the like; gradients reach the adapters only
    for p in frozen:
        p.requires_grad_(False)
    batches = range(0, len(order), settings.docs)
    try:
        for number, first in enumerate(batches):
            ids = order[first:first + settings.docs]
            if adapting and settings.max_seconds > 0 and adapted_targets:
                rate = adapt_seconds / adapted_targets
                adapting = time.perf_counter() - t0 + rate * int(lengths[order[first:]].sum()) <= settings.max_seconds
            begun = time.perf_counter()
            _run_batch(model, val_tokens, bounds[ids], lengths[ids], seq_len, settings, tables, device, totals,
                       adapting, seed)
            if adapting:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the rate must include the queued GPU work
                adapt_seconds += time.perf_counter() - begun
                adapted, adapted_targets = adapted + len(ids), adapted_targets + int(lengths[ids].sum())
            if log is not None and (number + 1) % max(1, len(batches) // 10) == 0:
                nll, _, nbytes = totals.sums.tolist()
                log(f"lora ttt batch {number + 1}/{len(batches)} (this rank): running val_bpb "
                    f"{nll / math.log(2) / max(nbytes, 1):.4f}, {adapted} documents adapted, "
                    f"{time.perf_counter() - t0:.0f}s")
    finally:
        for p, wanted in frozen.items():
            p.requires_grad_(wanted)
        model.train(was_training)
    adapted_all = torch.tensor([adapted], dtype=torch.float64, device=device)
    if world_size > 1:
        totals.reduce()
        dist.all_reduce(adapted_all, op=dist.ReduceOp.SUM)
    base = totals.result(time.perf_counter() - t0)
    return TTTResult(val_loss=base.val_loss, val_bpb=base.val_bpb, tokens=base.tokens, bytes=base.bytes,
                     seconds=base.seconds, chunks=len(lengths), adapted_chunks=int(adapted_all.item()),
                     adapt_seconds=adapt_seconds, unit="documents")


__all__ = ["LoRASettings", "evaluate_lora_ttt", "split_documents"]
