"""Softmax attention kept inside documents (``--doc-attention``), [B, H, T, D] with 4 KV heads, at 65,536 tokens
per GPU.

The candidate is what a training step runs: on CUDA, ``torch.compile`` of ``document_mask`` + ``attend``, which
is flex attention with a block mask; elsewhere the boolean mask through SDPA. Anchors: dense causal SDPA on the
flash backend (what the flag replaces: a ratio above 1 means attending inside documents costs less than
attending across them), SDPA with the boolean mask (what an eager model, evaluation included, runs), and torch's
variable-length FlashAttention (``torch.nn.attention.varlen``) on the same documents packed end to end (the
records' way; its sequence offsets need the host, so tgolf's compiled model does not use it). Documents have
geometric lengths, of mean 512 tokens at the contest shapes (the shared web-text validation shard: median 426,
mean 773). FLOPs are the dense causal count, so TFLOP/s compares with the causal anchor.
"""
from __future__ import annotations

import torch

from tgolf.bench.anchors import generator, randn
from tgolf.bench.core import BenchCase, Impl

TOKENS = 65536

# (B, T, H, Hkv, D, mean document length)
_SHAPES = {
    "quick": [(2, 40, 2, 1, 16, 8)],
    "contest": [(TOKENS // t, t, 8, 4, 64, 512) for t in (2048, 1024)],
    "sweep": [(TOKENS // t, t, h, h // 2, 64, 512) for h in (8, 12) for t in (1024, 2048, 4096)],
}


def _inputs(b: int, t: int, h: int, hkv: int, d: int, mean_document: int):
    def make(device: torch.device, seed: int) -> tuple:
        from tgolf.data.tokenizer import BOS_ID

        gen = generator(device, seed)
        q = randn((b, h, t, d), gen, device, torch.bfloat16)
        k, v = (randn((b, hkv, t, d), gen, device, torch.bfloat16) for _ in range(2))
        # a BOS begins a document with probability 1/mean at each position: geometric lengths; other ids > BOS
        starts = torch.rand((b, t), generator=gen, device=device) < 1.0 / mean_document
        ids = torch.where(starts, BOS_ID, BOS_ID + 1)
        return q, k, v, ids
    return make


def _document_attention(compile_on_cuda: bool):
    """tgolf's path: the mask built from the ids, then attention, as ``GPT.hidden_states`` does."""
    def load():
        from tgolf.data.tokenizer import BOS_ID
        from tgolf.nn.attention import attend, document_mask

        def run(q, k, v, ids):
            flex = q.is_cuda and torch.compiler.is_compiling()
            return attend(q, k, v, document_mask(ids, BOS_ID, flex=flex), enable_gqa=True)

        compiled = torch.compile(run, dynamic=False, fullgraph=True) if compile_on_cuda else run
        return lambda q, k, v, ids: (compiled if q.is_cuda else run)(q, k, v, ids)
    return load


def _reference():
    def load():
        from tgolf.data.tokenizer import BOS_ID
        from tgolf.nn.attention import attend, document_mask

        return lambda q, k, v, ids: attend(q.float(), k.float(), v.float(), document_mask(ids, BOS_ID, flex=False),
                                           enable_gqa=True)
    return load


def _sdpa_causal():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(q, k, v, ids):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return attend


def _packed(inputs: tuple) -> tuple:
    """[B, H, T, D] rows → [B·T, H, D] tokens end to end, the KV heads repeated (torch 2.11's varlen has no GQA),
    and the documents' offsets (every row also starts one), computed here on the host, untimed."""
    from tgolf.data.tokenizer import BOS_ID

    q, k, v, ids = inputs
    b, h, t, _ = q.shape
    groups = h // k.shape[1]
    pack = lambda x: x.repeat_interleave(groups, 1).transpose(1, 2).reshape(b * t, h, -1).contiguous()
    starts = ((ids == BOS_ID) | (torch.arange(t, device=ids.device) == 0)).flatten().nonzero().flatten()
    offsets = torch.cat([starts, starts.new_tensor([b * t])]).to(torch.int32)
    longest = int((offsets[1:] - offsets[:-1]).max())
    return pack(q), pack(k), pack(v), offsets, longest


def _varlen():
    from torch.nn.attention.varlen import varlen_attn

    return lambda q, k, v, offsets, longest: varlen_attn(q, k, v, offsets, offsets, longest, longest,
                                                         window_size=(-1, 0))


def _case(b: int, t: int, h: int, hkv: int, d: int, mean_document: int) -> BenchCase:
    tokens = b * t
    return BenchCase(
        op="attention.document", label=f"B{b} T{t} H{h}/{hkv} D{d} docs~{mean_document}",
        shape=dict(B=b, T=t, H=h, Hkv=hkv, D=d, doc=mean_document),
        make_inputs=_inputs(b, t, h, hkv, d, mean_document),
        candidate=Impl(_document_attention(compile_on_cuda=True)), reference=_reference(),
        anchors={"sdpa_causal": Impl(_sdpa_causal, cuda_only=True),
                 "sdpa_mask": Impl(_document_attention(compile_on_cuda=False)),
                 "varlen": Impl(_varlen, prepare=_packed, cuda_only=True)},
        # dense causal: QKᵀ and AV, 2·T·D multiply-adds each per query and head, half masked
        flops=2.0 * tokens * h * t * d, bytes=2.0 * tokens * d * (2 * h + 2 * hkv) + 8.0 * tokens,
        grad_argnums=(0, 1, 2),
    )


def cases(shapes: str) -> list[BenchCase]:
    return [_case(*s) for s in _SHAPES[shapes]]
