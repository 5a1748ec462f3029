"""``python -m tgolf.data prepare|download``: make contest shards from local text, or fetch the official ones."""
from __future__ import annotations

import argparse
import json
import sys

from .download import REPO_ID, DownloadError, download
from .prepare import DEFAULT_SHARD_TOKENS, prepare
from .shards import ShardError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tgolf.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize .txt/.jsonl/.jsonl.gz files into train and val shards",
                       description="Documents: one per JSON line (its \"text\" field) in .jsonl(.gz); blocks separated "
                                   "by blank lines in .txt(.gz). The first --val-docs documents form the val split.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="input files, read in this order")
    p.add_argument("--out", required=True, help="output folder (must be empty or new unless --force)")
    p.add_argument("--tokenizer", help="an existing SentencePiece .model (default: train one, official recipe)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size of the trained tokenizer (default 1024)")
    p.add_argument("--val-docs", type=int, default=None,
                   help="documents in the val split (default: a tenth of them, at most 50,000)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--force", action="store_true", help="replace shards, tokenizer and meta.json in --out")
    d = sub.add_parser("download", help="fetch the official cached FineWeb shards and tokenizer")
    d.add_argument("--variant", default="sp1024", help="tokenizer family, e.g. sp1024 (default) or sp4096")
    d.add_argument("--train-shards", type=int, default=80,
                   help="how many 100M-token train shards, a prefix of the official order (default 80, as the "
                        "official script: 8B tokens, about 16 GB)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--repo-id", default=REPO_ID, help=f"Hugging Face dataset repo (default {REPO_ID})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            meta = prepare(args.input, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab,
                           val_docs=args.val_docs, shard_tokens=args.shard_tokens, force=args.force)
            print(json.dumps({k: meta[k] for k in ("vocab_size", "docs", "tokens", "shards")}))
            print(f"wrote {args.out} (DATA_PATH={args.out} TOKENIZER_PATH={args.out}/tokenizer.model)")
        else:
            download(args.out, variant=args.variant, train_shards=args.train_shards, repo_id=args.repo_id)
            print(f"wrote {args.out}")
    except (DownloadError, ShardError, ValueError, FileExistsError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
