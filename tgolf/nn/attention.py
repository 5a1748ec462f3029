"""The baseline's softmax attention block: GQA, RMS-normed q and k, RoPE, per-head q gain, SDPA; optionally
partial RoPE (``rope_dims``), exclusive self attention (``xsa``), a value embedding (``value_bias``) and attention
kept inside each document (``mask``, from ``document_mask``).

Every attention module in tgolf.nn takes the same constructor arguments and maps [B, T, dim] → [B, T, dim],
so ``Config.attention`` swaps them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from tgolf.nn import make_linear
from tgolf.nn.rotary import Rotary, apply_rotary


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, *, num_heads: int, num_kv_heads: int, rope_base: float = 10000.0,
                 qk_gain_init: float = 1.5, linear: str = "bf16", window: int = 0, rope_dims: int = 0,
                 xsa: bool = False):
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"attention: dim={dim}, num_heads={num_heads}, num_kv_heads={num_kv_heads} do not divide")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = make_linear(linear, dim, dim)
        self.c_k = make_linear(linear, dim, kv_dim)
        self.c_v = make_linear(linear, dim, kv_dim)
        self.proj = make_linear(linear, dim, dim)
        self.proj.zero_init = True  # residual branches start at zero (baseline)
        self.q_gain = nn.Parameter(torch.full((num_heads,), float(qk_gain_init)))
        self.rotary = Rotary(self.head_dim, rope_base, rope_dims)
        self.xsa = xsa

    def project_qkv(self, x: torch.Tensor, value_bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, D], k and v [B, Hkv, T, D]: normed, rotated and gained as the baseline does;
        ``value_bias`` [B, T, Hkv·D] (a value embedding) is added to the values."""
        bsz, seq_len, _ = x.shape
        q = self.c_q(x).view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x)
        if value_bias is not None:
            v = v + value_bias.to(v.dtype)
        v = v.view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (self.head_dim,))
        k = F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary.tables(seq_len, x.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        return q, k, v

    def forward(self, x: torch.Tensor, value_bias: torch.Tensor | None = None,
                mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        """``mask``: which keys each query sees (``document_mask``); None = every earlier token of the row."""
        bsz, seq_len, dim = x.shape
        q, k, v = self.project_qkv(x, value_bias)
        y = attend(q, k, v, mask, enable_gqa=self.num_kv_heads != self.num_heads)
        if self.xsa:
            y = exclude_self_value(y, v)
        return self.proj(y.transpose(1, 2).reshape(bsz, seq_len, dim))


def exclude_self_value(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exclusive self attention (XSA; the 1.1271 and 1.1248 records of openai/parameter-golf use it on their
    last 4 layers): each head's output y_t [B, H, T, D] loses its component along the token's own value v_t
    [B, Hkv, T, D] (shared by the H / Hkv query heads of its group), so attention carries only what other tokens
    add; the token itself reaches the next layer through the residual stream."""
    bsz, heads, seq_len, head_dim = y.shape
    groups = y.view(bsz, v.shape[1], heads // v.shape[1], seq_len, head_dim)
    unit = F.normalize(v, dim=-1).unsqueeze(2)
    return (groups - (groups * unit).sum(-1, keepdim=True) * unit).view_as(y)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None,
           enable_gqa: bool) -> torch.Tensor:
    """Scaled dot-product attention of q [B, H, T, D] over k, v [B, Hkv, T, D]: causal when ``mask`` is None,
    else as ``mask`` allows (a flex-attention block mask or a boolean [B, 1, T, T] mask for SDPA)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def document_mask(input_ids: torch.Tensor, bos_id: int, flex: bool) -> torch.Tensor | BlockMask:
    """The keys each query of ``input_ids`` [B, T] may see when attention stays inside documents: the earlier
    tokens of its own document, which begins at a BOS token (a row's tokens before its first BOS are one document).
    The contest's shards put BOS before every document, so a row of the token stream holds several; the best
    record attends inside them with FlashAttention-3's varlen kernel (BRIEF §1).

    ``flex``: a flex-attention block mask, whose compiled kernel skips the tiles that cross documents (for CUDA
    under torch.compile: flex attention has no backward on the CPU, and run eagerly on a GPU it materialises every
    score); otherwise a boolean [B, 1, T, T] mask for SDPA, quadratic in T. Built once per forward, shared by the
    layers."""
    batch, seq_len = input_ids.shape
    documents = torch.cumsum(input_ids == bos_id, dim=1)
    if flex:
        def same_document_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (documents[b, q_idx] == documents[b, kv_idx])

        return create_block_mask(same_document_causal, batch, None, seq_len, seq_len, device=input_ids.device)
    positions = torch.arange(seq_len, device=input_ids.device)
    causal = positions[None, :] <= positions[:, None]
    return (causal & (documents[:, :, None] == documents[:, None, :])).unsqueeze(1)
