"""Data: the contest shard format, the distributed loader, tokenizers and byte tables, corpus preparation."""
from tgolf.data.corpus import prepare_default_data
from tgolf.data.loader import TokenLoader, load_val_tokens
from tgolf.data.prepare import prepare, write_dataset
from tgolf.data.shards import ShardError, list_shards, read_shard, write_shard
from tgolf.data.tokenizer import BOS_ID, ByteTables, build_byte_tables, load_tokenizer, train_tokenizer

__all__ = ["BOS_ID", "ByteTables", "ShardError", "TokenLoader", "build_byte_tables", "list_shards", "load_tokenizer",
           "load_val_tokens", "prepare", "prepare_default_data", "read_shard", "train_tokenizer", "write_dataset",
           "write_shard"]
