"""``python -m tgolf.eval --artifact FILE --data DIR --tokenizer MODEL``: score an artifact on any val shards.

``--eval-stride N`` scores sliding windows; ``--stateful`` carries linear/hybrid attention state across windows
and reports val_bpb by context length; ``--ttt-enabled`` scores while adapting the model to the tokens already
scored (tgolf.eval.ttt, or per document with ``--ttt-mode lora``: tgolf.eval.lora_ttt; the ``--ttt-*`` settings
default to the artifact's).

Prints the result as one JSON line (and writes it to ``--out`` when given). Under ``torchrun`` every rank scores
its share of the windows and rank 0 prints the all-reduced result.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tgolf.config import Config, add_config_arguments, env_overrides
from tgolf.data.loader import load_val_tokens
from tgolf.data.tokenizer import build_byte_tables
from tgolf.eval.bpb import evaluate
from tgolf.train.distributed import barrier


TTT_FIELDS = [f.name for f in dataclasses.fields(Config) if f.name.startswith("ttt_")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tgolf.eval", description=__doc__)
    p.add_argument("--artifact", required=True, help="artifact file written by tgolf.export")
    p.add_argument("--data", required=True, help="folder with fineweb_val_*.bin shards")
    p.add_argument("--tokenizer", help="SentencePiece .model (default: DIR/tokenizer.model)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the artifact's eval/train seq len)")
    p.add_argument("--eval-stride", type=int, default=None,
                   help="sliding-window stride; 0 = non-overlapping windows (default: the artifact's setting)")
    p.add_argument("--batch-tokens", type=int, default=0, help="tokens per forward batch over all ranks")
    p.add_argument("--val-tokens-limit", type=int, default=0, help="score only the first N val tokens (0 = all)")
    p.add_argument("--stateful", action="store_true",
                   help="carry linear/hybrid attention state across windows (val_bpb by context length)")
    p.add_argument("--num-streams", type=int, default=0,
                   help="--stateful: parallel streams over all ranks (default: world size)")
    add_config_arguments(p, TTT_FIELDS)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", help="also write the JSON result to this file")
    return p


def _setting(config, name: str, default: int) -> int:
    return int(getattr(config, name, 0) or default)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        from tgolf.export import load_artifact  # lazy: the exporter is optional for the rest of tgolf.eval

        model, config = load_artifact(args.artifact, device)
        # the artifact's TTT settings, then the environment's (TTT_ENABLED=1, ...), then the flags
        env = {name: value for name, value in env_overrides(os.environ).items() if name in TTT_FIELDS}
        flags = {name: getattr(args, name) for name in TTT_FIELDS if getattr(args, name) is not None}
        config = dataclasses.replace(config, **{**env, **flags}).validate()
        if args.stateful and config.ttt_enabled:
            raise ValueError("--stateful and score-first TTT (--ttt-enabled, or the artifact's ttt_enabled) are two "
                             "different evaluations: choose one (--no-ttt-enabled turns TTT off)")
        seq_len = args.seq_len or _setting(config, "eval_seq_len", _setting(config, "train_seq_len", 1024))
        stride = args.eval_stride if args.eval_stride is not None else _setting(config, "eval_stride", 0)
        batch_tokens = args.batch_tokens or _setting(config, "val_batch_size", 524_288)
        tokenizer = args.tokenizer or str(Path(args.data) / "tokenizer.model")
        tables = build_byte_tables(tokenizer, _setting(config, "vocab_size", 0))
        val = load_val_tokens(args.data, seq_len, args.val_tokens_limit, vocab_size=tables.vocab_size)
        if args.stateful:
            from tgolf.eval.stateful import evaluate_stateful

            result = evaluate_stateful(model, val, seq_len, tables, device, num_streams=args.num_streams or world_size,
                                       rank=rank, world_size=world_size)
        elif config.ttt_enabled:
            from tgolf.eval.ttt import evaluate_configured_ttt

            result = evaluate_configured_ttt(config, model, val, seq_len, batch_tokens, tables, device, rank=rank,
                                             world_size=world_size, stride=stride)
        else:
            result = evaluate(model, val, seq_len, batch_tokens, tables, device, rank=rank, world_size=world_size,
                              stride=stride)
        barrier()  # every rank done before the group goes (tgolf.train.distributed.teardown says why)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    if rank == 0:
        record = {**result.as_dict(), "artifact": str(args.artifact),
                  "artifact_bytes": Path(args.artifact).stat().st_size, "seq_len": seq_len, "eval_stride": stride,
                  "device": str(device), "world_size": world_size}
        line = json.dumps(record)
        print(line)
        if args.out:
            Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
