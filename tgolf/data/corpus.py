"""The embedded default corpus: the Python standard library's own source files.

Every machine that runs tgolf has them, so ``python -m tgolf.train`` works with no data at all. Each ``.py`` file is
one document; files are taken in an order fixed by a hash of their relative path (a spread of packages in both
splits rather than an alphabetical slice), tests and third-party folders skipped, until about ``max_bytes``.
Prepared shards are cached under a key hashed from the chosen files' contents and the settings, so a second run
(or another rank) reuses them and a different Python version gets its own.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from .prepare import META_FILE, TOKENIZER_FILE, write_dataset

CORPUS_VERSION = 1  # bump when the selection or preparation changes, to invalidate caches
MAX_BYTES = 4_000_000
MAX_FILE_BYTES = 200_000  # a few huge files are data blobs (pydoc topics), not code
VAL_FRACTION = 10  # one document in ten goes to val
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_documents(max_bytes: int = MAX_BYTES) -> list[tuple[str, str]]:
    """``(relative path, source text)`` of the chosen standard-library files, in corpus order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        candidates.append((hashlib.sha1(rel.encode()).hexdigest(), rel, path))
    docs, total = [], 0
    for _, rel, path in sorted(candidates):
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        docs.append((rel, text))
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    if len(docs) < 2 * VAL_FRACTION:
        raise RuntimeError(f"the standard library at {root} gave only {len(docs)} source files; pass DATA_PATH")
    return docs


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tgolf"


def prepare_default_data(cache_dir: str | os.PathLike | None = None, vocab_size: int = 1024,
                         max_bytes: int = MAX_BYTES, progress: bool | None = None) -> tuple[Path, Path]:
    """Shards and tokenizer of the embedded corpus, prepared once and cached: ``(data_path, tokenizer_path)``."""
    docs = stdlib_documents(max_bytes)
    key = hashlib.sha256(f"v{CORPUS_VERSION} vocab={vocab_size}".encode())
    for rel, text in docs:
        key.update(rel.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / f"stdlib-sp{vocab_size}-{key.hexdigest()[:16]}"
    if (out / META_FILE).is_file():
        return out, out / TOKENIZER_FILE
    cache.mkdir(parents=True, exist_ok=True)
    # Build in a private folder, then rename: concurrent callers never see a half-written dataset.
    tmp = Path(tempfile.mkdtemp(prefix=".stdlib-", dir=cache))
    try:
        write_dataset(lambda: (text for _, text in docs), tmp, vocab_size=vocab_size,
                      val_docs=len(docs) // VAL_FRACTION, force=True, progress=progress,
                      sources=[f"python stdlib {sysconfig.get_paths()['stdlib']} ({len(docs)} files)"])
        try:
            tmp.rename(out)
        except OSError:
            if not (out / META_FILE).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, out / TOKENIZER_FILE
