"""Data: the contest shard format, the distributed loader, tokenizers and byte tables, corpus preparation.

Names are imported on first use, so that a run on ready-made shards does not import (and count in its code
bytes) the preparation of a corpus.
"""
from __future__ import annotations

from tgolf._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "tgolf.data.corpus": ("prepare_default_data",),
    "tgolf.data.loader": ("TokenLoader", "load_val_tokens"),
    "tgolf.data.prepare": ("prepare", "write_dataset"),
    "tgolf.data.shards": ("ShardError", "list_shards", "read_shard", "write_shard"),
    "tgolf.data.tokenizer": ("BOS_ID", "ByteTables", "build_byte_tables", "load_tokenizer", "train_tokenizer"),
})
