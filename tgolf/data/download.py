"""Fetch the official cached FineWeb shards and tokenizer from the Hugging Face dataset repo.

The export (openai/parameter-golf ``data/cached_challenge_fineweb.py``) lives in the dataset repo
``willdepueoai/parameter-golf`` under the remote root ``datasets/``: ``manifest.json`` lists each dataset's shard
counts and tokenizer; shards sit in ``datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin``. Plain
``urllib`` is used (no extra dependency); files land flat in ``--out`` with the tokenizer as ``tokenizer.model``,
so the folder works directly as DATA_PATH.
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from .shards import ShardError, atomic_output, read_header, shard_name
from .prepare import META_FILE, TOKENIZER_FILE

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"
TIMEOUT_S = 60.0


class DownloadError(RuntimeError):
    """The download could not be done (no network, missing file); the message says what and where."""


def resolve_url(repo_id: str, remote_path: str) -> str:
    return f"https://huggingface.co/datasets/{repo_id}/resolve/main/{remote_path}"


def fetch(url: str, dest: Path, timeout: float = TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` through a temp file in the same folder (no partial files left behind)."""
    try:
        with atomic_output(dest) as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot download {url}: {reason}. Is there a network connection? Without one, prepare "
                            f"shards from local text with `python -m tgolf.data prepare`") from None
    return dest


def _valid_shard(path: Path) -> bool:
    try:
        read_header(path)
        return True
    except (ShardError, FileNotFoundError):
        return False


def download(out_dir: str | os.PathLike, variant: str = "sp1024", train_shards: int = 80, repo_id: str = REPO_ID,
             remote_root: str = REMOTE_ROOT, timeout: float = TIMEOUT_S, log=print) -> dict:
    """Fetch the val shards, the first ``train_shards`` train shards and the tokenizer of ``variant``.

    Valid shards already in ``out_dir`` are kept. Returns the manifest entry of the dataset.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = remote_root.strip("/")
    prefix = f"{root}/" if root else ""
    manifest_path = fetch(resolve_url(repo_id, f"{prefix}manifest.json"), out / "manifest.json", timeout)
    manifest = json.loads(manifest_path.read_text())
    name = f"fineweb10B_{variant}"
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if entry is None:
        known = [d.get("name") for d in manifest.get("datasets", [])]
        raise DownloadError(f"dataset {name} is not in the manifest of {repo_id} (it lists {known})")
    stats = entry.get("stats") or {}
    have_train, have_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if not 0 <= train_shards <= have_train:
        raise DownloadError(f"{name} has {have_train} train shards on {repo_id}; asked for {train_shards}")
    files = [shard_name("val", i) for i in range(have_val)] + [shard_name("train", i) for i in range(train_shards)]
    for i, fname in enumerate(files, 1):
        dest = out / fname
        if _valid_shard(dest):
            continue
        log(f"[{i}/{len(files)}] {fname}")
        fetch(resolve_url(repo_id, f"{prefix}datasets/{name}/{fname}"), dest, timeout)
        if not _valid_shard(dest):
            raise DownloadError(f"downloaded {dest} is not a valid shard")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), {})
    model_path = tokenizer.get("model_path")
    if not model_path:
        raise DownloadError(f"the manifest of {repo_id} names no tokenizer model for {name}")
    fetch(resolve_url(repo_id, f"{prefix}{model_path}"), out / TOKENIZER_FILE, timeout)
    (out / META_FILE).write_text(json.dumps({"source": f"hf://datasets/{repo_id}/{prefix}datasets/{name}",
                                             "tokenizer": TOKENIZER_FILE, "tokenizer_source": model_path,
                                             "train_shards": train_shards, "val_shards": have_val,
                                             "manifest_entry": entry}, indent=2) + "\n")
    return entry
