"""Linear and hybrid attention blocks, drop-in replacements for the GPT's softmax attention.

Both reuse CausalSelfAttention's projections (c_q, c_k, c_v, proj), RMS-normed q/k, RoPE and per-head q gain
(``project_qkv``) and map x [B, T, dim] → [B, T, dim], so ``Config.attention = "linear" | "hybrid"`` swaps them in.

LinearAttention: o = linear_attention(φ(q), φ(k), v, decay) with
  * feature map φ (default "identity": signed scores, RetNet/GLA style, with a parameter-free per-head RMS norm of
    the output; the positive maps elu1/relu/taylor/hedgehog use the key-sum normaliser instead, see feature_maps);
  * decay (default "head": a learnable log decay per head, initialised RetNet-style to half-lives from ~22 to
    ~2800 tokens, g = −exp(θ) < 0 always; "token": a data-dependent gate g = logsigmoid(W x + b)/16 as in GLA;
    "none").
HybridAttention: softmax over the last ``window`` tokens (positions t−W < s ≤ t; blocked SDPA, O(T·W), see
``sliding_window_attention``) plus linear attention over the tokens older than the window (s ≤ t−W), so every
token is counted exactly once:
    y_t = SWA_t + λ_h · norm(LIN_t),   LIN_t = Σ_{s ≤ t−W} exp(g_{s+1}+…+g_t) φ(q_t)·φ(k_s) v_s
The two parts keep their own normalisations and are summed with a learned per-head gate λ (init 0.1), which is
simpler and more stable than sharing one softmax/linear denominator. LIN is the plain op applied to keys and values
shifted W positions right (zeros in front), with the decay of the W skipped steps folded into q (per-head
constant: exp(W g_h)) or into the shifted keys (per-token gates: exp(G_{s+W} − G_s)).

Documents (``starts``, True at each document's BOS; the GPT's ``doc_attention``): the state is reset at every
start by a log decay of RESET_LOG_DECAY added to that token's gate (so a head's constant decay becomes a per-token
gate), which scales everything before the start by exp(−30) ≈ 1e-13, far below what float32 (let alone bf16)
resolves beside the document's own terms; and the hybrid's window sees only keys of the query's document.

Streaming (stateful evaluation): ``start_stream()`` makes the module carry, from one call to the next, the
recurrent state, the absolute RoPE position, and for the hybrid the last W keys/values/gates/starts;
``stop_stream()`` ends it. tgolf.eval.stateful drives this for every such module of a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tgolf.nn.attention import CausalSelfAttention
from tgolf.nn.rotary import apply_rotary
from tgolf.ops.linear_attention import linear_attention
from tgolf.ops.linear_attention.feature_maps import divide_by_key_sum, make_feature_map, with_key_sum

DECAYS = ("none", "head", "token")
GATE_TEMPERATURE = 16.0  # GLA's normaliser: gates close to 1 at init, learnable without saturating
# The log decay a document start adds to its token's gate: large enough to erase the state (exp(−30) ≈ 1e-13),
# small enough that cumulative sums over many documents keep their float32 resolution (−30 per document).
RESET_LOG_DECAY = -30.0


@dataclass
class StreamState:
    """What a module carries between consecutive windows of one stream (batch rows are independent streams)."""

    offset: int = 0  # absolute position of the window's first token (RoPE)
    state: torch.Tensor | None = None  # linear-attention state [B, H, Dk', Dv(+1)] float32
    keys: torch.Tensor | None = None  # hybrid: last ≤ W rotated keys [B, Hkv, ≤W, D]
    values: torch.Tensor | None = None  # hybrid: last ≤ W values [B, Hkv, ≤W, D]
    gates: torch.Tensor | None = None  # hybrid with per-token decay: last ≤ W log gates [B, ≤W, H]
    starts: torch.Tensor | None = None  # hybrid with documents: last ≤ W document-start flags [B, ≤W]


def _head_decay_init(num_heads: int) -> torch.Tensor:
    """θ with −exp(θ) = log(1 − 2^−e), e evenly spread over [5, 12] (RetNet's range of decay rates)."""
    rates = 2.0 ** -torch.linspace(5.0, 12.0, num_heads)
    return (-torch.log1p(-rates)).log()


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             documents: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q [B, H, T, D] over keys s with t − W < s ≤ t; k, v [B, Hkv, S, D] with S ≥ T hold
    S − T earlier positions first (a streaming cache). ``documents`` [B, S] (document ids of the key positions;
    the queries are the last T): keys of other documents are masked too. Blocked, O(S·W) instead of a dense
    [T, S] mask:

    the key stream gets W zero rows in front and is cut into blocks of W; the queries of block b see keys of blocks
    b − 1 and b (2W keys), under the same band mask for every block (local query i, key j: i < j ≤ i + W), except
    block 0, whose first W keys are the zero padding and are masked out. Every query sees at least itself.
    """
    bsz, heads, seq_len, dim = q.shape
    total, W = k.shape[2], window
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # blocks fold into the batch dims below
    nb = -(-total // W)
    q = F.pad(q, (0, 0, total - seq_len, nb * W - total))  # queries aligned with their key positions
    # block-major [B, nb, H, ·, D], so that a mask per (row, block) broadcasts over the heads
    k = F.pad(k, (0, 0, W, nb * W - total)).unfold(2, 2 * W, W).permute(0, 2, 1, 4, 3)  # [B, nb, H, 2W, D]
    v = F.pad(v, (0, 0, W, nb * W - total)).unfold(2, 2 * W, W).permute(0, 2, 1, 4, 3)
    q = q.view(bsz, heads, nb, W, dim).transpose(1, 2)  # [B, nb, H, W, D]
    i, j = torch.arange(W, device=q.device)[:, None], torch.arange(2 * W, device=q.device)[None, :]
    mask = (j > i) & (j <= i + W)  # [W, 2W]
    if documents is not None:  # [B, nb, 1, W, 2W]: the band, within the query's document
        query_docs = F.pad(documents, (0, nb * W - total), value=-1).view(bsz, nb, W)
        key_docs = F.pad(documents, (W, nb * W - total), value=-1).unfold(1, 2 * W, W)  # [B, nb, 2W]
        mask = (mask & (query_docs[..., :, None] == key_docs[..., None, :]))[:, :, None]
    first = mask[:, 0] if mask.dim() == 5 else mask  # 4-D inputs, which the fused SDPA kernels need
    out = [F.scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0], attn_mask=first & (j >= W)).unsqueeze(1)]
    if nb > 1:
        flat = lambda t: t[:, 1:].reshape(bsz * (nb - 1), heads, t.shape[3], dim)
        rest_mask = mask[:, 1:].reshape(bsz * (nb - 1), 1, W, 2 * W) if mask.dim() == 5 else mask
        rest = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=rest_mask)
        out.append(rest.view(bsz, nb - 1, heads, W, dim))
    return torch.cat(out, 1).transpose(1, 2).reshape(bsz, heads, nb * W, dim)[:, :, total - seq_len:total]


class LinearAttention(CausalSelfAttention):
    def __init__(self, dim: int, *, num_heads: int, num_kv_heads: int, rope_base: float = 10000.0,
                 qk_gain_init: float = 1.5, linear: str = "bf16", window: int = 0,
                 feature_map: str = "identity", decay: str = "head", eps: float = 1e-6, chunk_size: int = 64,
                 rope_dims: int = 0):
        super().__init__(dim, num_heads=num_heads, num_kv_heads=num_kv_heads, rope_base=rope_base,
                         qk_gain_init=qk_gain_init, linear=linear, window=window, rope_dims=rope_dims)
        if decay not in DECAYS:
            raise ValueError(f"LinearAttention: decay {decay!r}: expected one of {DECAYS}")
        self.feature_map = make_feature_map(feature_map, self.head_dim)
        self.feature_dim = self.feature_map.out_dim(self.head_dim)
        self.decay = decay
        self.eps, self.chunk_size = eps, chunk_size
        if decay == "head":
            self.log_decay_rate = nn.Parameter(_head_decay_init(num_heads))
        elif decay == "token":
            self.gate = nn.Linear(dim, num_heads, bias=True)
            with torch.no_grad():  # start near the "head" rates: logsigmoid(b)/16 = log(1 − rate)
                keep = torch.exp(GATE_TEMPERATURE * -_head_decay_init(num_heads).exp())
                self.gate.bias.copy_(torch.logit(keep))
                self.gate.weight.mul_(0.1)
        self.stream: StreamState | None = None

    # --- streaming -------------------------------------------------------------------------------------------
    def start_stream(self) -> None:
        self.stream = StreamState()

    def stop_stream(self) -> None:
        self.stream = None

    def _state(self) -> torch.Tensor | None:
        return self.stream.state if self.stream is not None else None

    # --- pieces ----------------------------------------------------------------------------------------------
    def log_decay(self, x: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor | None:
        """g ≤ 0: None, [H] or [B, T, H] (float32); with document ``starts`` [B, T] always [B, T, H], with
        RESET_LOG_DECAY added where a document starts."""
        g = None
        if self.decay == "head":
            g = -self.log_decay_rate.float().exp()
        elif self.decay == "token":
            g = F.logsigmoid(self.gate(x).float()) / GATE_TEMPERATURE
        if starts is None:
            return g
        reset = starts.float()[..., None] * RESET_LOG_DECAY  # [B, T, 1]
        return reset.expand(-1, -1, self.num_heads) if g is None else g + reset

    def rotated_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """project_qkv, with RoPE at absolute positions while streaming (R_{p+t} = R_p ∘ R_t)."""
        q, k, v = self.project_qkv(x)
        if self.stream is not None and self.stream.offset:
            angles = self.stream.offset * self.rotary.inv_freq.double()  # float64: exact for long streams
            cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
               initial_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature-mapped q [B, T, H, D'], k [B, T, Hkv, D'], v [B, T, Hkv, D] → (normalised y, state)."""
        if self.feature_map.normalize:
            v = with_key_sum(v)
        y, state = linear_attention(q, k, v, decay=g, initial_state=initial_state, output_state=True,
                                    scale=1.0 / math.sqrt(self.feature_dim), chunk_size=self.chunk_size)
        if self.feature_map.normalize:
            return divide_by_key_sum(y, self.eps), state
        return F.rms_norm(y, (y.shape[-1],)), state

    def forward(self, x: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """``starts`` [B, T] bool: True where a document starts (its BOS); None = one stream per row."""
        bsz, seq_len, dim = x.shape
        q, k, v = self.rotated_qkv(x)
        phi = self.feature_map
        q, k, v = phi(q.transpose(1, 2)), phi(k.transpose(1, 2)), v.transpose(1, 2)
        y, state = self.attend(q, k, v, self.log_decay(x, starts), self._state())
        if self.stream is not None:
            self.stream.state, self.stream.offset = state.detach(), self.stream.offset + seq_len
        return self.proj(y.reshape(bsz, seq_len, dim))


class HybridAttention(LinearAttention):
    def __init__(self, dim: int, *, num_heads: int, num_kv_heads: int, rope_base: float = 10000.0,
                 qk_gain_init: float = 1.5, linear: str = "bf16", window: int = 256,
                 feature_map: str = "identity", decay: str = "head", eps: float = 1e-6, chunk_size: int = 64,
                 rope_dims: int = 0):
        if window < 1:
            raise ValueError(f"HybridAttention: window={window} must be ≥ 1 (the softmax span)")
        super().__init__(dim, num_heads=num_heads, num_kv_heads=num_kv_heads, rope_base=rope_base,
                         qk_gain_init=qk_gain_init, linear=linear, window=window, feature_map=feature_map,
                         decay=decay, eps=eps, chunk_size=chunk_size, rope_dims=rope_dims)
        self.window = window
        self.linear_gain = nn.Parameter(torch.full((num_heads,), 0.1))

    def forward(self, x: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """``starts`` [B, T] bool: True where a document starts (its BOS); None = one stream per row."""
        bsz, seq_len, dim = x.shape
        W, stream = self.window, self.stream
        q, k, v = self.rotated_qkv(x)  # [B, H|Hkv, T, D]
        g = self.log_decay(x, starts)
        keys, values = k, v  # [B, Hkv, P+T, D] with the P ≤ W cached positions of a stream first
        if stream is not None and stream.keys is not None:
            keys, values = torch.cat((stream.keys, k), 2), torch.cat((stream.values, v), 2)
        all_starts = documents = None
        if starts is not None:  # the window's document ids, cached positions included
            past_starts = stream.starts if stream is not None and stream.starts is not None else starts[:, :0]
            all_starts = torch.cat((past_starts, starts), 1)  # [B, P+T]
            documents = all_starts.cumsum(1)
        y_swa = sliding_window_attention(q, keys, values, W, documents).transpose(1, 2)  # [B, T, H, D]

        # Older tokens: shift keys/values W positions right so the op at position t sees exactly s ≤ t − W.
        # Padding rows hold zero keys (after φ): their scores, hence also their key-sum column, are zero.
        past = keys.shape[2] - seq_len
        pad = W - past  # past ≤ W, so the padded stream has W + T rows; row i holds position t_i − W
        phi = self.feature_map
        k_old = F.pad(phi(keys.transpose(1, 2)), (0, 0, 0, 0, pad, 0))[:, :seq_len]
        v_old = F.pad(values.transpose(1, 2), (0, 0, 0, 0, pad, 0))[:, :seq_len]
        qf = phi(q.transpose(1, 2))
        if g is not None and g.dim() == 1:  # per head: exp(g (t − s)) = exp(g W) · exp(g (t − (s + W)))
            qf = qf * torch.exp(W * g).to(qf.dtype)[:, None]
        elif g is not None:  # per token: exp(G_t − G_s) = exp(G_t − G_{s+W}) · exp(G_{s+W} − G_s), per query head
            past_g = stream.gates if stream is not None and stream.gates is not None else g[:, :0]
            gates = torch.cat((past_g, g), 1)  # [B, P+T, H]
            cum = F.pad(gates.cumsum(1), (0, 0, 1, 0))  # cum[j] = sum of the first j gates
            skip = (cum[:, W + 1:] - cum[:, 1:-W]).exp()  # G_{j+W} − G_j (empty while P + T ≤ W)
            skip = F.pad(skip, (0, 0, pad, 0))[:, :seq_len]  # aligned with the rows of k_old
            group = self.num_heads // self.num_kv_heads
            k_old = k_old.repeat_interleave(group, dim=2) * skip[..., None].to(k_old.dtype)
            v_old = v_old.repeat_interleave(group, dim=2)
        y_lin, state = self.attend(qf, k_old, v_old, g, self._state())
        y = y_swa + self.linear_gain.to(y_swa.dtype)[:, None] * y_lin.to(y_swa.dtype)
        if stream is not None:
            stream.state, stream.offset = state.detach(), stream.offset + seq_len
            stream.keys, stream.values = keys[:, :, -W:].detach(), values[:, :, -W:].detach()
            if g is not None and g.dim() == 3:
                stream.gates = gates[:, -W:].detach()
            if all_starts is not None:
                stream.starts = all_starts[:, -W:]
        return self.proj(y.reshape(bsz, seq_len, dim))

__all__ = ["LinearAttention", "HybridAttention", "StreamState", "DECAYS"]
