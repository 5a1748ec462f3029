"""Cheap token-level inputs the records stack on the embedding: a hashed bigram table, a smear gate, and a
token embedding added to the attention values of a few layers.

The bigram table and the smear gate appear in the openai/parameter-golf record at 1.1458; the 1.1248 record used a
2048 × 128 table, ~0.3M parameters that give the first layer what a small vocabulary lacks, the identity of the
token pair. Later record stacks add the value embedding.
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


class ProjectedTable(nn.Module):
    """A ``rows`` × ``dim`` table whose rows are projected to ``out_dim``; the projection starts at zero, so a
    model starts as it would without the table (whose rows start at N(0, 0.02))."""

    def __init__(self, rows: int, dim: int, out_dim: int):
        super().__init__()
        self.table = nn.Embedding(rows, dim)
        self.proj = nn.Linear(dim, out_dim, bias=False)
        nn.init.normal_(self.table.weight, std=0.02)
        nn.init.zeros_(self.proj.weight)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(rows))


class BigramHashEmbedding(ProjectedTable):
    """``num_buckets`` hashed token pairs (``bigram_buckets``), each a ``dim``-wide row projected to ``model_dim``."""

    def __init__(self, num_buckets: int, dim: int, model_dim: int):
        if num_buckets < 2:
            raise ValueError(f"BigramHashEmbedding: num_buckets={num_buckets} must be >= 2")
        super().__init__(num_buckets, dim, model_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(bigram_buckets(input_ids, self.table.num_embeddings))


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


class ValueEmbedding(ProjectedTable):
    """A ``vocab_size`` × ``dim`` token table projected to ``kv_dim``: one shared bias for the attention values
    of the layers that take it, each layer with a learned scale of its own (later record stacks use a 128-wide
    table on the last two of 11 layers)."""

    def __init__(self, vocab_size: int, dim: int, kv_dim: int):
        super().__init__(vocab_size, dim, kv_dim)
