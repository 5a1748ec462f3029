"""The baseline GPT of the Parameter Golf contest, with its parts chosen by name from tgolf.nn.

9 × 512 at the baseline preset: GQA attention, relu² MLP, tied embeddings, U-Net skips from the first half
of the blocks to the second, per-block mix with the embedding x0, tanh logit softcap (17,059,912 parameters).
The records' additions are fields that default to off: partial RoPE, LN scale, XSA, SmearGate, bigram hash
table, orthogonal init (the ``record`` preset turns them on), value embeddings, attention inside documents,
depth recurrence and parallel residual lanes. The model reads only the model fields of the run's Config
(num_layers ... loss), so one dataclass describes both.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from tgolf.config import Config
from tgolf.data.tokenizer import BOS_ID
from tgolf.nn import get_loss, make_attention, make_mlp
from tgolf.nn.attention import document_mask
from tgolf.nn.embeddings import BigramHashEmbedding, SmearGate, ValueEmbedding
from tgolf.nvtx import nvtx_range

Stream = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # one residual stream, or a parallel block's two lanes


def _add(x: Stream, y: torch.Tensor) -> Stream:
    """``x + y`` on the stream, or on both lanes."""
    return (x[0] + y, x[1] + y) if isinstance(x, tuple) else x + y


class Block(nn.Module):
    def __init__(self, cfg: Config, index: int):
        super().__init__()
        dim = cfg.model_dim
        self.attention_kind = cfg.layer_attention_kinds()[index]
        self.attn = make_attention(self.attention_kind, dim, num_heads=cfg.num_heads,
                                   num_kv_heads=cfg.num_kv_heads, rope_base=cfg.rope_base,
                                   qk_gain_init=cfg.qk_gain_init, linear=cfg.linear, window=cfg.attention_window,
                                   feature_map=cfg.linear_feature_map, decay=cfg.linear_decay,
                                   rope_dims=cfg.rope_dims, xsa=index in cfg.xsa_layers())
        self.mlp = make_mlp(cfg.mlp, dim, cfg.mlp_mult * dim, activation=cfg.mlp_activation,
                            negative_slope=cfg.negative_slope, linear=cfg.linear)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        # LN scale (the 1.1248 record): deeper blocks read their input at 1/sqrt(index + 1), a constant
        self.norm_scale = (index + 1) ** -0.5 if cfg.ln_scale else 1.0
        # this layer's weight of the shared value embedding (GPT.value_embed), if it takes it
        self.value_embed_scale = nn.Parameter(torch.ones(())) if index in cfg.value_embed_indices() else None
        # Parallel residuals (openai/parameter-golf PR #1204, from modded-nanogpt PR #230): attention reads one
        # lane, the MLP the other, and each sublayer writes to both with its own per-channel weights. The MLP's
        # lane takes attn_scale and mlp_scale, as the sequential stream does; these two weigh what the attention's
        # lane takes. Equal weights keep the lanes equal, so the block starts as the sequential one. The last
        # layer joins the lanes: the head reads the MLP's lane, and nothing would read an attention lane after it.
        self.parallel = index in cfg.parallel_layers()
        self.splits = self.parallel and index < cfg.num_layers - 1
        if self.splits:
            self.lane_attn_scale = nn.Parameter(torch.ones(dim))
            self.lane_mlp_scale = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x, (x.shape[-1],))
        return normed * self.norm_scale if self.norm_scale != 1.0 else normed

    def _attention(self, x: torch.Tensor, value_embed: torch.Tensor | None,
                   documents: tuple[torch.Tensor | BlockMask, torch.Tensor] | None) -> torch.Tensor:
        extra = {}
        if documents is not None:
            mask, starts = documents
            extra = {"mask": mask} if self.attention_kind == "softmax" else {"starts": starts}
        if self.value_embed_scale is not None:
            extra["value_bias"] = self.value_embed_scale.to(value_embed.dtype) * value_embed
        return self.attn(self._norm(x), **extra)

    def forward(self, x: Stream, x0: torch.Tensor, value_embed: torch.Tensor | None = None,
                documents: tuple[torch.Tensor | BlockMask, torch.Tensor] | None = None) -> Stream:
        """``x``: the residual stream [B, T, dim]; a parallel block takes it, or the previous parallel block's
        (attention's lane, MLP's lane), and returns its two lanes (the last layer: the MLP's). ``documents``
        (``doc_attention``, from ``GPT.hidden_states``): (the softmax layers' mask, the document starts [B, T]
        that linear and hybrid layers reset their state at), or None."""
        mix = self.resid_mix.to(x0.dtype)
        if not self.parallel:
            x = mix[0] * x + mix[1] * x0
            with nvtx_range("attention"):
                x = x + self.attn_scale.to(x.dtype) * self._attention(x, value_embed, documents)
            with nvtx_range("mlp"):
                return x + self.mlp_scale.to(x.dtype) * self.mlp(self._norm(x))
        a, m = x if isinstance(x, tuple) else (x, x)
        a, m = mix[0] * a + mix[1] * x0, mix[0] * m + mix[1] * x0
        with nvtx_range("attention"):
            y = self._attention(a, value_embed, documents)
            m = m + self.attn_scale.to(y.dtype) * y
            if self.splits:
                a = a + self.lane_attn_scale.to(y.dtype) * y
        with nvtx_range("mlp"):
            y = self.mlp(self._norm(m))
            m = m + self.mlp_scale.to(y.dtype) * y
            return (a + self.lane_mlp_scale.to(y.dtype) * y, m) if self.splits else m


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.bigram = (BigramHashEmbedding(cfg.bigram_vocab_size, cfg.bigram_dim, cfg.model_dim)
                       if cfg.bigram_vocab_size else None)
        self.smear = SmearGate(cfg.model_dim) if cfg.smear_gate else None
        self.value_embed = (ValueEmbedding(cfg.vocab_size, cfg.value_embed_dim, cfg.num_kv_heads * cfg.head_dim)
                            if cfg.value_embed_indices() else None)
        # The blocks run in `layer_order`: each layer once, or with the recurrence on, recur_layers recur_passes
        # times in a row. The U-Net pairs the first half of that order with the second, so turning the recurrence
        # on re-pairs them; skip_weights has a row for each pair of the longer order, and the plain order uses the
        # first rows.
        looped, layers = cfg.recur_range(), range(cfg.num_layers)
        self._orders = {False: list(layers), True: [*layers[: looped.start], *list(looped) * cfg.recur_passes,
                                                    *layers[looped.stop:]] if looped else list(layers)}
        self.recurrence_active = bool(looped)  # a plain attribute: torch.compile guards on it
        num_skips = max(len(order) // 2 for order in self._orders.values())
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))
        self.blocks = nn.ModuleList(Block(cfg, index) for index in range(cfg.num_layers))
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False)
        self.loss_fn = get_loss(cfg.loss)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.config.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.config.tied_embed_init_std)
        for module in self.modules():
            if getattr(module, "zero_init", False):
                nn.init.zeros_(module.weight)
        if self.config.ortho_init:  # the records' init of the input-side matrices (the outputs start at zero)
            for block in self.blocks:
                for layer in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
                    nn.init.orthogonal_(layer.weight)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)

    def layer_order(self, recurrence: bool | None = None) -> list[int]:
        """The indices of the blocks in the order they run, with the recurrence on or off (default: as it is)."""
        return self._orders[self.recurrence_active if recurrence is None else recurrence]

    def set_recurrence(self, active: bool) -> bool:
        """Turn the depth recurrence on or off; False (and nothing changed) when the model has none."""
        if self._orders[True] == self._orders[False]:
            return False
        self.recurrence_active = active
        return True

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states [B, T, dim] (before the lm head)."""
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids).to(x.dtype)
        x = F.rms_norm(x, (self.config.model_dim,))
        if self.smear is not None:
            x = self.smear(x)
        value_embed = self.value_embed(input_ids) if self.value_embed is not None else None
        documents = None
        if self.config.doc_attention:
            starts = input_ids == BOS_ID
            mask = None
            if "softmax" in self.config.layer_attention_kinds():  # one mask for all softmax layers; flex kernels
                flex = input_ids.is_cuda and torch.compiler.is_compiling()  # where inductor compiles for a GPU
                mask = document_mask(input_ids, BOS_ID, flex=flex)
            documents = mask, starts
        order = self.layer_order()
        encoder = len(order) // 2
        x0, skips, stream = x, [], x
        for i in order[:encoder]:
            stream = self.blocks[i](stream, x0, value_embed, documents)
            skips.append(stream)
        for pair, i in enumerate(order[encoder:]):
            if skips:  # from a parallel block, its MLP lane: the one the head would read
                skip = skips.pop()
                skip = skip[1] if isinstance(skip, tuple) else skip
                stream = _add(stream, self.skip_weights[pair].to(x.dtype) * skip)
            stream = self.blocks[i](stream, x0, value_embed, documents)
        return F.rms_norm(stream, (self.config.model_dim,))  # the last layer joins any lanes

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Softcapped fp32 logits [B, T, V] (evaluation and tests; training uses the loss directly)."""
        hidden = self.hidden_states(input_ids)
        logits = F.linear(hidden, self.head_weight.to(hidden.dtype)).float()
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of ``targets`` [B, T]; ``reduction="none"`` gives per-token losses [B, T] in nats."""
        hidden = self.hidden_states(input_ids)
        with nvtx_range("loss"):
            loss = self.loss_fn(hidden.reshape(-1, hidden.shape[-1]), self.head_weight.to(hidden.dtype),
                                targets.reshape(-1), self.config.logit_softcap, reduction)
        return loss if reduction == "mean" else loss.view_as(targets)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
