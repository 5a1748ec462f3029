"""Cheap token-level inputs the records stack on the embedding: a hashed bigram table, a smear gate, and a
token embedding added to the attention values of a few layers.

Both come from the openai/parameter-golf records (BigramHash and SmearGate appear in the 1.1458 record; the 1.1248
record used a 2048 × 128 table): they give the first layer what a small vocabulary lacks, the identity of the
token pair, for ~0.3M parameters.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Odd multipliers for the pair hash (any two distinct odd constants spread the pairs; these are arbitrary).
_PREVIOUS_MUL, _CURRENT_MUL = 1_000_003, 8_191


def bigram_buckets(input_ids: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Row of the (previous, current) token pair at each position of ``input_ids`` [B, T]: a hash into rows
    0 .. num_buckets - 2; the first position of each sequence, which has no previous token, gets the last row."""
    ids = input_ids.long()
    pairs = (ids[:, :-1] * _PREVIOUS_MUL + ids[:, 1:] * _CURRENT_MUL) % (num_buckets - 1)
    return F.pad(pairs, (1, 0), value=num_buckets - 1)


class BigramHashEmbedding(nn.Module):
    """``num_buckets`` × ``dim`` table of hashed token pairs, projected to ``model_dim``; the projection starts at
    zero, so the model starts as it would without the table."""

    def __init__(self, num_buckets: int, dim: int, model_dim: int):
        super().__init__()
        if num_buckets < 2:
            raise ValueError(f"BigramHashEmbedding: num_buckets={num_buckets} must be >= 2")
        self.num_buckets = num_buckets
        self.table = nn.Embedding(num_buckets, dim)
        self.proj = nn.Linear(dim, model_dim, bias=False)
        nn.init.normal_(self.table.weight, std=0.02)
        nn.init.zeros_(self.proj.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(bigram_buckets(input_ids, self.num_buckets)))


class SmearGate(nn.Module):
    """x_t ← (1 − g) ⊙ x_t + g ⊙ x_{t−1}, g = sigmoid(gate) per channel (learned; it starts at an even blend).
    The first position of a sequence blends with zeros."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate).to(x.dtype)
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))
        return x + g * (previous - x)


class ValueEmbedding(nn.Module):
    """A ``vocab_size`` × ``dim`` token table projected to ``kv_dim``: one shared bias for the attention values
    of the layers that take it, each layer with a learned scale of its own (later record stacks use a 128-wide
    table on the last two of 11 layers). The projection starts at zero, so the model starts as it would without
    it."""

    def __init__(self, vocab_size: int, dim: int, kv_dim: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, dim)
        self.proj = nn.Linear(dim, kv_dim, bias=False)
        nn.init.normal_(self.table.weight, std=0.02)
        nn.init.zeros_(self.proj.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(input_ids))
