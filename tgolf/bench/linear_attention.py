"""Causal linear attention with per-token log decay, [B, T, H, D], at 65,536 tokens per GPU.

Anchors: softmax attention through ``F.scaled_dot_product_attention`` restricted to the flash backend (what
linear attention must beat to pay at contest lengths), fla's ``chunk_simple_gla`` where ``fla`` imports, and
the plain-PyTorch masked quadratic form batched over sequences (eager and compiled) at lengths where its
[B, H, T, T] matrices fit, and where tgolf's state passes walk segments, its own forward without them
(``whole_walk``). Correctness is checked against the family's reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tgolf.bench.anchors import compiled, eager, first_output, generator, randn
from tgolf.bench.core import BenchCase, Impl

TOKENS = 65536
CHUNK = 64  # the chunk length the flop count assumes (the chunked form's intra-chunk quadratic part)
_QUADRATIC_MAX_T = 2048  # above this the reference's [H, T, T] intermediates are too large to time

# (B, T, H, D)
_SHAPES = {
    "quick": [(1, 40, 2, 16)],
    # The lengths tgolf issue 6 names; those where the targets differ first (a time budget cuts the last).
    "contest": [(TOKENS // t, t, 8, 64) for t in (1024, 16384, 4096, 32768, 8192, 2048)],
    "sweep": [(TOKENS // t, t, 8, d) for d in (64, 128) for t in (1024, 2048, 4096, 8192, 16384, 32768)],
}


def _inputs(b: int, t: int, h: int, d: int):
    def make(device: torch.device, seed: int) -> tuple:
        gen = generator(device, seed)
        q, k, v = (randn((b, t, h, d), gen, device, torch.bfloat16) for _ in range(3))
        g = F.logsigmoid(randn((b, t, h), gen, device, torch.float32) + 4.0)  # decays ≈ 0.98 per token
        return q, k, v, g
    return make


def _candidate(scale: float):
    def load():
        from tgolf.ops.linear_attention import linear_attention

        return lambda q, k, v, g: linear_attention(q, k, v, decay=g, scale=scale)
    return first_output(load)


def _whole_walk(scale: float) -> Impl:
    """tgolf's forward with its state passes walking each sequence whole (kernels' WHOLE_WALK): beside the candidate
    where that one walks segments, what the segments save. Forward only: the backward runs after the call returns."""
    def load():
        from tgolf.kernels import linear_attention as kern
        from tgolf.ops.linear_attention import linear_attention

        def attend(q, k, v, g):
            kern.WHOLE_WALK = True
            try:
                return linear_attention(q, k, v, decay=g, scale=scale)
            finally:
                kern.WHOLE_WALK = False
        return attend
    return Impl(first_output(load), forward_only=True)


def _reference(scale: float):
    def load():
        from tgolf.ops.linear_attention.reference import linear_attention_quadratic

        return lambda q, k, v, g: linear_attention_quadratic(q, k, v, decay=g, scale=scale, dtype=torch.float32)
    return first_output(load)


def _quadratic_batched(scale: float):
    """o = scale · ((q kᵀ) ⊙ D) v with D[t, s] = exp(G_t − G_s) for s ≤ t: what PyTorch alone offers."""
    def attend(q, k, v, g):
        cum = g.float().cumsum(1).transpose(1, 2)  # [B, H, T]
        t = q.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * decay
        return (torch.einsum("bhts,bshd->bthd", scores, v.float()) * scale).to(q.dtype)
    return lambda: attend


def _to_bhtd(inputs: tuple) -> tuple:
    q, k, v, g = inputs
    return q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), g


def _sdpa_flash():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(q, k, v, g):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attend


def _fla(scale: float):
    def load():
        from fla.ops.simple_gla import chunk_simple_gla

        return lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g, scale=scale)
    return first_output(load)


def _segmented(t: int) -> bool:
    """Whether the timed call's state passes walk segments (tgolf.kernels.linear_attention.segment_chunks): at
    65,536 tokens, from T = 8192 (tests/test_linear_attention.py checks this against the cost model)."""
    return t >= 8192


def _check_inputs(t: int, h: int, d: int):
    """Smaller inputs for the correctness check of a long case, whose reference would not fit: two sequences of
    1024 tokens (several chunks), or, where the timed passes walk segments, one sequence of 4096, whose passes
    walk segments too."""
    if _segmented(t):
        return _inputs(1, 4096, h, d)
    return _inputs(2, 1024, h, d) if t > 1024 else None


def _case(b: int, t: int, h: int, d: int) -> BenchCase:
    scale = d ** -0.5
    anchors = {"sdpa_flash": Impl(_sdpa_flash, prepare=_to_bhtd, cuda_only=True),
               "fla_chunk": Impl(_fla(scale), cuda_only=True)}
    if _segmented(t):
        anchors["whole_walk"] = _whole_walk(scale)
    if t <= _QUADRATIC_MAX_T:
        quadratic = _quadratic_batched(scale)
        anchors.update(eager=eager(quadratic), compiled=compiled(quadratic))
    tokens = b * t
    return BenchCase(
        op="linear_attention.linear_attention", label=f"B{b} T{t} H{h} D{d}", shape=dict(B=b, T=t, H=h, D=d),
        make_inputs=_inputs(b, t, h, d), candidate=Impl(_candidate(scale)), reference=_reference(scale),
        anchors=anchors,
        # chunked form per token and head: intra-chunk scores and values (2·C·D each, half kept by the causal
        # mask) plus the state read and update (2·D² each).
        flops=tokens * h * 2.0 * d * (CHUNK + 2 * d), bytes=tokens * h * (4 * 2.0 * d + 4.0),
        grad_argnums=(0, 1, 2),
        check_inputs=_check_inputs(t, h, d),
    )


def cases(shapes: str) -> list[BenchCase]:
    return [_case(*s) for s in _SHAPES[shapes]]
