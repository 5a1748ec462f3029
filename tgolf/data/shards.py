"""The contest shard format: a 256-int32 header, then uint16 tokens.

Layout (BRIEF §1): 256 little-endian int32 ``[MAGIC, VERSION, num_tokens, 0, ...]`` (1024 bytes), then
``num_tokens`` little-endian uint16 token ids; the file size is exactly ``1024 + 2 * num_tokens``.
Readers memory-map the tokens so a 100M-token shard costs no RAM until it is touched.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_TOKEN_ID = np.iinfo(np.uint16).max
SPLITS = ("train", "val")


class ShardError(ValueError):
    """A shard file that does not follow the format; the message names the file and the field."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only once fully written (temp file in the same folder, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_header(path: str | os.PathLike) -> int:
    """Validate the header and size of ``path``; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {path}: no such file") from None
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != MAGIC:
        raise ShardError(f"shard {path}: header magic is {int(header[0])}, expected {MAGIC} (not a token shard?)")
    if int(header[1]) != VERSION:
        raise ShardError(f"shard {path}: header version is {int(header[1])}, expected {VERSION}")
    num_tokens = int(header[2])
    if num_tokens < 0:
        raise ShardError(f"shard {path}: header num_tokens is negative ({num_tokens})")
    expected = HEADER_BYTES + TOKEN_DTYPE.itemsize * num_tokens
    if size != expected:
        state = "truncated" if size < expected else "longer than declared"
        raise ShardError(f"shard {path}: {state}: header num_tokens={num_tokens} implies {expected} bytes, "
                         f"file has {size}")
    return num_tokens


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """Raise if any id is >= ``vocab_size``; ``where`` names the source in the message."""
    if tokens.size == 0:
        return
    top = int(tokens.max())
    if top >= vocab_size:
        first = int(np.argmax(tokens >= vocab_size))
        raise ShardError(f"{where}: token id {top} >= vocab_size {vocab_size} (first bad id at token index {first})")


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map the tokens of a validated shard (read-only uint16 array).

    ``vocab_size`` additionally scans every token id (reads the whole file once).
    """
    num_tokens = read_header(path)
    if num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    if vocab_size is not None:
        check_token_ids(tokens, vocab_size, f"shard {path}")
    return tokens


def write_shard(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray, overwrite: bool = False) -> int:
    """Write ``tokens`` as a shard, atomically (temp file in the same folder, then rename).

    Refuses to replace an existing file unless ``overwrite``. Returns the number of tokens written.
    """
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"write_shard {path}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID):
        raise ValueError(f"write_shard {path}: token ids must be integers in [0, {MAX_TOKEN_ID}] to fit uint16")
    if path.exists() and not overwrite:
        raise FileExistsError(f"write_shard: {path} exists (pass overwrite=True to replace it)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, arr.size)
    with atomic_output(path) as f:
        f.write(header.tobytes())
        f.write(arr.astype(TOKEN_DTYPE, copy=False).tobytes())
    return int(arr.size)


def shard_name(split: str, index: int) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return f"fineweb_{split}_{index:06d}.bin"


def list_shards(data_path: str | os.PathLike, split: str) -> list[Path]:
    """The ``fineweb_{split}_*.bin`` files of ``data_path``, sorted by name; a clear error if there are none."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(data_path)
    if not root.is_dir():
        raise FileNotFoundError(f"data path {root} is not a directory")
    files = sorted(root.glob(f"fineweb_{split}_*.bin"))
    if not files:
        raise FileNotFoundError(f"no {split} shards (fineweb_{split}_*.bin) in {root}; prepare some with "
                                f"`python -m tgolf.data prepare` or `python -m tgolf.data download`")
    return files
