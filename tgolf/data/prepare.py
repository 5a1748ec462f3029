"""Text to contest shards: read documents, train (or take) a tokenizer, write val and train shards.

Inputs: ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line with a string ``text`` field: one document each) and
``.txt`` / ``.txt.gz`` (documents separated by one or more blank lines, so a paragraph-per-block text becomes one
document per paragraph; a file without blank lines is a single document).
Output folder: ``fineweb_val_000000.bin...`` (the first ``val_docs`` documents), ``fineweb_train_000000.bin...``
(the rest), BOS (id 1) before every document and no EOS, as in the official export; ``tokenizer.model``;
``meta.json`` (counts, vocabulary, tokenizer, sources).
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .shards import shard_name, write_shard
from .tokenizer import BOS_ID, load_tokenizer, train_tokenizer

DocSource = Callable[[], Iterable[str]]  # called once per pass over the corpus
TOKENIZER_FILE = "tokenizer.model"
META_FILE = "meta.json"
DEFAULT_SHARD_TOKENS = 100_000_000  # the official shard size
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _kind(path: Path) -> str:
    name = path.name.lower()
    for ext in (".jsonl.gz", ".jsonl", ".txt.gz", ".txt"):
        if name.endswith(ext):
            return ext.split(".")[1]
    raise ValueError(f"input {path}: unsupported file type (use .txt, .txt.gz, .jsonl or .jsonl.gz)")


def iter_file_documents(path: str | os.PathLike) -> Iterator[str]:
    """The documents of one input file (see the module docstring for the formats)."""
    path = Path(path)
    kind = _kind(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {path}: no such file")
    try:
        with _open_text(path) as f:
            if kind == "txt":
                for block in _BLANK_LINES.split(f.read().replace("\r\n", "\n")):
                    if block.strip():
                        yield block.strip("\n")
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: bad JSON ({exc.msg} at column {exc.colno})") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a string \"text\" field")
                yield text
    except UnicodeDecodeError as exc:
        raise ValueError(f"input {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"input {path}: cannot read ({exc})") from None


def file_documents(paths: Sequence[str | os.PathLike]) -> DocSource:
    """A reusable document source over input files, in the given order."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no input files given")
    for p in paths:
        _kind(p)
        if not p.is_file():
            raise FileNotFoundError(f"input {p}: no such file")
    return lambda: itertools.chain.from_iterable(iter_file_documents(p) for p in paths)


class ShardWriter:
    """Streams tokens of one split into ``fineweb_{split}_NNNNNN.bin`` files of ``shard_tokens`` tokens each."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.buf = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = self.shards = self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < tokens.size:
            take = min(self.buf.size - self.fill, tokens.size - pos)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill, pos = self.fill + take, pos + take
            if self.fill == self.buf.size:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            self.tokens += write_shard(self.out_dir / shard_name(self.split, self.shards), self.buf[:self.fill])
            self.shards += 1
            self.fill = 0


def _progress(total: int, desc: str, show: bool | None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="doc", disable=not (sys.stderr.isatty() if show is None else show))


def _clear_output(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"output {out_dir} exists and is not empty (pass --force / force=True to replace "
                                  f"its shards, tokenizer and meta.json)")
        for stale in [*out_dir.glob("fineweb_train_*.bin"), *out_dir.glob("fineweb_val_*.bin"),
                      out_dir / TOKENIZER_FILE, out_dir / META_FILE]:
            stale.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def write_dataset(documents: DocSource, out_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                  vocab_size: int | None = None, val_docs: int | None = None,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, force: bool = False, progress: bool | None = None,
                  sources: Sequence[str] = (), encode_batch: int = 512) -> dict:
    """Tokenize ``documents()`` into shards under ``out_dir``; returns the meta.json contents.

    ``val_docs=None`` takes a tenth of the documents (at least 1, at most the official 50,000). Without
    ``tokenizer`` one is trained with the official recipe on the train documents (``vocab_size``, default 1024).
    """
    out_dir = Path(out_dir)
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens={shard_tokens} must be positive")
    t0 = time.perf_counter()
    num_docs = sum(1 for _ in documents())
    val_docs = max(1, min(50_000, num_docs // 10)) if val_docs is None else val_docs
    if not 0 < val_docs < num_docs:
        raise ValueError(f"val_docs={val_docs} must leave at least one document for each split "
                         f"(the input has {num_docs} documents)")
    tok_bytes = None
    if tokenizer is not None:  # check a given tokenizer before touching the output folder
        given = load_tokenizer(tokenizer)
        if vocab_size is not None and given.vocab_size() != vocab_size:
            raise ValueError(f"tokenizer {tokenizer} has {given.vocab_size()} pieces, but vocab_size={vocab_size} "
                             f"was asked")
        if given.vocab_size() > 65536:
            raise ValueError(f"tokenizer {tokenizer} has {given.vocab_size()} pieces: too many for uint16 shards")
        tok_bytes = Path(tokenizer).read_bytes()
    _clear_output(out_dir, force)
    tok_path = out_dir / TOKENIZER_FILE
    if tok_bytes is None:
        train_tokenizer(itertools.islice(documents(), val_docs, None), tok_path, vocab_size or 1024)
    else:
        tok_path.write_bytes(tok_bytes)
    sp = load_tokenizer(tok_path)

    writers = {split: ShardWriter(out_dir, split, shard_tokens) for split in ("val", "train")}
    counts = {"val": 0, "train": 0}
    docs = iter(documents())
    with _progress(num_docs, "tokenizing", progress) as bar:
        while batch := list(itertools.islice(docs, encode_batch)):
            for ids in sp.encode(batch, out_type=int, num_threads=os.cpu_count() or 1):
                split = "val" if counts["val"] < val_docs else "train"
                writers[split].add(np.asarray([BOS_ID, *ids], dtype=np.uint16))
                counts[split] += 1
            bar.update(len(batch))
    for w in writers.values():
        w.flush()
    meta = {
        "format": "fineweb shards (BRIEF §1): 256 x int32 header, uint16 tokens, BOS before every document",
        "vocab_size": sp.vocab_size(),
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": hashlib.sha256(tok_path.read_bytes()).hexdigest(),
        "tokenizer_trained": tok_bytes is None,
        "tokenizer_source": None if tokenizer is None else str(tokenizer),
        "docs": counts,
        "tokens": {s: w.tokens for s, w in writers.items()},
        "shards": {s: w.shards for s, w in writers.items()},
        "shard_tokens": shard_tokens,
        "sources": list(sources),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def prepare(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
            vocab_size: int | None = None, val_docs: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            force: bool = False, progress: bool | None = None) -> dict:
    """``python -m tgolf.data prepare``: input files to shards (see the module docstring)."""
    sources = [str(Path(p).resolve()) for p in inputs]
    return write_dataset(file_documents(inputs), out_dir, tokenizer=tokenizer, vocab_size=vocab_size,
                         val_docs=val_docs, shard_tokens=shard_tokens, force=force, progress=progress,
                         sources=sources)
