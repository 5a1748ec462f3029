"""General-purpose compression of the serialized model, in a tiny self-describing container.

Container layout (all of it counts toward the artifact bytes, so it is kept to a few bytes):

    offset 0   4 bytes   magic b"TGZ1"
    offset 4   1 byte    L = length of the compressor name
    offset 5   L bytes   compressor name, ASCII ("zlib" | "lzma" | "brotli" | "zstd")
    offset 5+L           the compressed stream, to the end of the file

Loading reads the name from the container, so no flag has to travel with the artifact.
Settings are the strongest each library offers: zlib level 9, lzma preset 9 | PRESET_EXTREME (xz format,
CRC64), brotli quality 11 (largest window), zstd level 22. ``"best"`` runs all four (in threads: each library
releases the GIL while it works) and keeps the smallest output, ties going to the earlier name in NAMES.

brotli and zstandard are dependencies of tgolf, but an install made with ``--no-deps`` (as on the GPU machines)
may lack them: then ``"best"`` uses the compressors that import, and ``check_available`` lets a run fail at its
start, not after training, when the one it asks for is missing.
"""
from __future__ import annotations

import importlib
import importlib.util
import lzma
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

MAGIC = b"TGZ1"
NAMES = ("zlib", "lzma", "brotli", "zstd")
_LZMA_PRESET = 9 | lzma.PRESET_EXTREME


_MODULES = {"brotli": "brotli", "zstd": "zstandard"}  # compressors whose library may be missing


def _library(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        raise ValueError(f"compressor {name!r} needs the Python package {_MODULES[name]!r}, which is not installed "
                         f"(pip install {_MODULES[name]})") from None


def available_compressors() -> tuple[str, ...]:
    """The names in NAMES whose library imports here."""
    return tuple(n for n in NAMES if n not in _MODULES or importlib.util.find_spec(_MODULES[n]) is not None)


def check_available(method: str) -> None:
    """Raise ValueError now if ``method`` ("best" or a name) could not compress at the end of a run."""
    if method == "best":
        return
    if method not in NAMES:
        raise ValueError(f"compressor {method!r}: expected one of {NAMES} or 'best'")
    if method in _MODULES:
        _library(method)


def _zstd_compress(data: bytes) -> bytes:
    return _library("zstd").ZstdCompressor(level=22).compress(data)


def _zstd_decompress(data: bytes) -> bytes:
    # the frame records the content size (ZstdCompressor writes it by default), so one call suffices
    return _library("zstd").ZstdDecompressor().decompress(data)


_CODECS: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    "zlib": (lambda d: zlib.compress(d, 9), zlib.decompress),
    "lzma": (lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, preset=_LZMA_PRESET), lzma.decompress),
    "brotli": (lambda d: _library("brotli").compress(d, quality=11, lgwin=24),
               lambda d: _library("brotli").decompress(d)),
    "zstd": (_zstd_compress, _zstd_decompress),
}


def _container(name: str, payload: bytes) -> bytes:
    return MAGIC + bytes([len(name)]) + name.encode("ascii") + payload


def compress_all(data: bytes, names: tuple[str, ...] = NAMES) -> dict[str, bytes]:
    """Every named compressor's container for ``data``, computed in parallel threads."""
    for name in names:
        if name not in _CODECS:
            raise ValueError(f"compressor {name!r}: expected one of {NAMES} or 'best'")
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        streams = list(pool.map(lambda n: _CODECS[n][0](data), names))
    return {name: _container(name, stream) for name, stream in zip(names, streams)}


def compress(data: bytes, method: str = "best") -> tuple[bytes, str, dict[str, int]]:
    """(container bytes, compressor used, size of each compressor tried)."""
    candidates = compress_all(data, available_compressors() if method == "best" else (method,))
    chosen = min(candidates, key=lambda n: (len(candidates[n]), NAMES.index(n)))
    return candidates[chosen], chosen, {name: len(blob) for name, blob in candidates.items()}


def decompress(container: bytes) -> tuple[bytes, str]:
    """(the original bytes, the compressor's name); a damaged container raises ValueError saying what is wrong."""
    if len(container) < len(MAGIC) + 1:
        raise ValueError(f"artifact container: {len(container)} bytes is too short to hold the header")
    if container[: len(MAGIC)] != MAGIC:
        raise ValueError(f"artifact container: bad magic {bytes(container[:len(MAGIC)])!r}, expected {MAGIC!r}")
    length = container[len(MAGIC)]
    start = len(MAGIC) + 1 + length
    try:
        name = bytes(container[len(MAGIC) + 1: start]).decode("ascii")
    except UnicodeDecodeError:
        name = "?"
    if len(container) < start or name not in _CODECS:
        raise ValueError(f"artifact container: unknown compressor name {name!r}, expected one of {NAMES}")
    check_available(name)  # a missing library is its own error, not a corrupt stream
    try:
        return _CODECS[name][1](bytes(container[start:])), name
    except Exception as exc:  # each library raises its own error type
        raise ValueError(f"artifact container: the {name} stream is corrupt or truncated ({exc})") from None
