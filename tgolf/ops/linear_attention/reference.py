"""Plain-PyTorch truth for causal linear attention with log-space decay.

    o_t = scale · Σ_{s≤t} exp(g_{s+1} + … + g_t) (q_t·k_s) v_s  (+ scale · exp(g_1 + … + g_t) q_t S_0)
    S_T = exp(g_1 + … + g_T) S_0 + Σ_s exp(g_{s+1} + … + g_T) k_s v_sᵀ

Two independent forms: the quadratic one materialises the [T, T] decay matrix (run it in float64 for tests),
the recurrent one walks the tokens one by one. Both take the public op's arguments, already normalised:
``decay`` is None or per token [B, T, H] (a per-head constant is expanded by the caller or here).
"""
from __future__ import annotations

import torch


def _expand_decay(decay: torch.Tensor | None, batch: int, seq_len: int, heads: int,
                  like: torch.Tensor) -> torch.Tensor:
    """The log decay as [B, T, H] in ``like``'s dtype (zeros when absent)."""
    if decay is None:
        return like.new_zeros(batch, seq_len, heads)
    if decay.dim() == 1:
        return decay.to(like.dtype)[None, None, :].expand(batch, seq_len, heads)
    return decay.to(like.dtype)


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, Hkv, D] → [B, T, H, D] by head sharing (GQA)."""
    return x.repeat_interleave(heads // x.shape[2], dim=2) if x.shape[2] != heads else x


def _segments(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int) -> list[tuple[int, int, int]]:
    """(batch index, start, end) of every independent sequence."""
    if cu_seqlens is None:
        return [(b, 0, seq_len) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def linear_attention_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               decay: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                               initial_state: torch.Tensor | None = None, scale: float = 1.0,
                               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, Dv] in q's dtype, final state [N, H, Dk, Dv] float32) computed in ``dtype``."""
    batch, seq_len, heads, _ = q.shape
    qf, kf, vf = q.to(dtype), _repeat_kv(k, heads).to(dtype), _repeat_kv(v, heads).to(dtype)
    g = _expand_decay(decay, batch, seq_len, heads, qf)
    outs, states = [], []
    for i, (b, start, end) in enumerate(_segments(cu_seqlens, batch, seq_len)):
        qs, ks, vs = qf[b, start:end], kf[b, start:end], vf[b, start:end]  # [L, H, D]
        cum = g[b, start:end].cumsum(0).transpose(0, 1)  # [H, L]: G_t = g_1 + … + g_t
        length = end - start
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        expo = (cum[:, :, None] - cum[:, None, :]).masked_fill(~causal, float("-inf"))
        weights = expo.exp()  # [H, t, s]
        scores = torch.einsum("thd,shd->hts", qs, ks) * weights
        out = torch.einsum("hts,shd->thd", scores, vs)
        last = cum[:, -1] if length else cum.new_zeros(heads)
        state = torch.einsum("hs,shk,shv->hkv", (last[:, None] - cum).exp(), ks, vs)
        if initial_state is not None:
            s0 = initial_state[i].to(dtype)
            out = out + torch.einsum("ht,thk,hkv->thv", cum.exp(), qs, s0)
            state = state + last.exp()[:, None, None] * s0
        outs.append((b, start, end, out * scale))
        states.append(state)
    o = q.new_empty(batch, seq_len, heads, v.shape[-1], dtype=dtype)
    for b, start, end, out in outs:
        o[b, start:end] = out
    return o.to(q.dtype), torch.stack(states).float()


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               decay: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                               initial_state: torch.Tensor | None = None, scale: float = 1.0,
                               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token form of the same op: S ← exp(g_t) S + k_t v_tᵀ, o_t = scale · q_t S."""
    batch, seq_len, heads, dk = q.shape
    dv = v.shape[-1]
    qf, kf, vf = q.to(dtype), _repeat_kv(k, heads).to(dtype), _repeat_kv(v, heads).to(dtype)
    g = _expand_decay(decay, batch, seq_len, heads, qf)
    o = q.new_empty(batch, seq_len, heads, dv, dtype=dtype)
    states = []
    for i, (b, start, end) in enumerate(_segments(cu_seqlens, batch, seq_len)):
        state = (initial_state[i].to(dtype).clone() if initial_state is not None
                 else qf.new_zeros(heads, dk, dv))
        for t in range(start, end):
            state = g[b, t].exp()[:, None, None] * state + kf[b, t, :, :, None] * vf[b, t, :, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", qf[b, t], state)
        states.append(state)
    return o.to(q.dtype), torch.stack(states).float()
