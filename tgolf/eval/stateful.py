"""Stateful evaluation: score the validation stream window by window, carrying each linear-attention layer's state.

Where tgolf.eval.bpb scores each window from a cold start (context ≤ seq_len), here every LinearAttention /
HybridAttention module keeps its recurrent state (and the hybrid its last W keys/values) from one window to the
next, so a token's context reaches back to the start of its stream, far beyond what a softmax model can afford.
Softmax layers in the same model still see only their own window.

The stream can be cut into ``num_streams`` contiguous parts scored side by side as a batch (each part starts cold);
parts are shared out over ranks. Every target is scored exactly once, with the contest's byte accounting
(``tgolf.eval.bpb.token_bytes``), and the result is also split by context length: the number of tokens of the
target's document the model has seen (since the last BOS, or since the start of its stream part), bucketed.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from tgolf.data.tokenizer import ByteTables
from tgolf.eval.bpb import EvalResult, Totals, autocast_for, require_group, token_bytes
from tgolf.nn.linear_attention import LinearAttention

DEFAULT_BUCKETS = (0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)  # lower edges; the last is open


@dataclass
class StatefulResult:
    overall: EvalResult
    buckets: list[dict] = field(default_factory=list)  # {context_from, context_to, tokens, bytes, val_loss, val_bpb}

    def as_dict(self) -> dict:
        return {**self.overall.as_dict(), "by_context": self.buckets}


@contextlib.contextmanager
def streaming(model: torch.nn.Module) -> Iterator[list[LinearAttention]]:
    """Inside this block every linear/hybrid attention module of ``model`` carries its state across calls."""
    modules = [m for m in model.modules() if isinstance(m, LinearAttention)]
    for m in modules:
        m.start_stream()
    try:
        yield modules
    finally:
        for m in modules:
            m.stop_stream()


def _bucket_results(sums: torch.Tensor, edges: Sequence[int]) -> list[dict]:
    out = []
    for i, (nll, tokens, nbytes) in enumerate(sums.tolist()):
        if tokens == 0:
            continue
        out.append({"context_from": int(edges[i]), "context_to": int(edges[i + 1]) if i + 1 < len(edges) else None,
                    "tokens": int(tokens), "bytes": int(nbytes), "val_loss": nll / tokens,
                    "val_bpb": nll / math.log(2) / nbytes if nbytes else float("nan")})
    return out


def evaluate_stateful(model: torch.nn.Module, val_tokens: torch.Tensor, seq_len: int, tables: ByteTables,
                      device: torch.device | str, *, num_streams: int = 1, rank: int = 0, world_size: int = 1,
                      bos_id: int = 1, buckets: Sequence[int] = DEFAULT_BUCKETS) -> StatefulResult:
    """Score ``val_tokens`` (1-D ints) carrying state across windows of ``seq_len`` tokens.

    ``model(x, y, reduction="none")`` must give per-token nats [B, T] (the tgolf GPT does). ``num_streams`` parts
    (over all ranks, a multiple of ``world_size``) run as one batch per rank; more parts = faster, less context.
    """
    if seq_len <= 0 or num_streams <= 0 or num_streams % world_size:
        raise ValueError(f"evaluate_stateful: need seq_len > 0 and num_streams a positive multiple of world_size; "
                         f"got seq_len={seq_len}, num_streams={num_streams}, world_size={world_size}")
    device = torch.device(device)
    t0 = time.perf_counter()
    val_tokens = torch.as_tensor(val_tokens)
    num_targets = val_tokens.numel() - 1
    if num_targets < num_streams:
        raise ValueError(f"evaluate_stateful: {num_targets} targets cannot fill num_streams={num_streams}")
    part = math.ceil(num_targets / num_streams)  # targets per stream part (the last one is padded, unscored)
    per_rank = num_streams // world_size
    starts = torch.arange(rank * per_rank, (rank + 1) * per_rank) * part  # first input token of each part
    edges = torch.tensor(list(buckets), device=device)
    bucket_sums = torch.zeros(len(buckets), 3, dtype=torch.float64, device=device)
    totals = Totals(device)
    tables = tables.to(device)
    offsets = torch.arange(seq_len)
    doc_start = starts.to(device)  # per part: where the current document began (the part's start at first)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_for(device), streaming(model):
            for w in range(math.ceil(part / seq_len)):
                local = w * seq_len + offsets  # target index within the part
                pos = starts[:, None] + local  # absolute index of each input token
                valid = (local < part) & (pos < num_targets)
                pos = pos.clamp(max=num_targets - 1)
                x = val_tokens[pos].to(device=device, dtype=torch.int64)
                y = val_tokens[pos + 1].to(device=device, dtype=torch.int64)
                valid, pos = valid.to(device), pos.to(device)
                nll = model(x, y, reduction="none").float()
                nbytes = token_bytes(x, y, tables)
                totals.add(nll, nbytes, valid)
                # context: tokens of the current document seen so far (BOS opens a document)
                bos_pos = torch.where(x == bos_id, pos, -1).cummax(dim=1).values
                doc = torch.maximum(bos_pos, doc_start[:, None])
                doc_start = doc[:, -1]
                context = pos - doc + 1
                index = (torch.bucketize(context, edges, right=True) - 1).clamp(min=0)
                values = torch.stack((nll.double(), torch.ones_like(nll, dtype=torch.float64), nbytes.double()), -1)
                bucket_sums.index_add_(0, index.flatten(), (values * valid[..., None]).reshape(-1, 3))
    finally:
        model.train(was_training)
    if world_size > 1:
        require_group("evaluate_stateful", world_size)
        totals.reduce()
        dist.all_reduce(bucket_sums, op=dist.ReduceOp.SUM)
    return StatefulResult(totals.result(time.perf_counter() - t0), _bucket_results(bucket_sums, list(buckets)))


__all__ = ["evaluate_stateful", "streaming", "StatefulResult", "DEFAULT_BUCKETS"]
