"""``python -m tgolf.export --trained RUN/trained.pt --out FILE [--export-* ...] [--score]``: export a run's trained
weights again with other export settings, without training again.

The run must have been started with ``--save-trained``. Settings come from the run's config, then the environment,
then these flags: ``--export-scheme``, ``--export-embed-scheme``, ``--export-mlp-scheme``, ``--export-fit``,
``--export-clip-search``, ``--export-clip-sigmas``, ``--export-embed-clip-sigmas``, ``--export-lowrank-rank``,
``--export-lowrank-embed-rank``, ``--export-lowrank-scheme``, ``--gptq-tokens``, ``--gptq-calibration``,
``--gptq-self-seq-len``, ``--gptq-self-temperatures``, ``--compressor``, ``--max-artifact-bytes``. GPTQ
calibrates on the first ``--gptq-tokens`` of the train shards (the run itself read the tokens after its last
step's), or with ``--gptq-calibration self`` on text the model samples. The code bytes counted towards the limit
are the run's (``code_bytes`` in the ``summary.json`` beside the file) unless ``--code-bytes`` says otherwise:
corrections or GPTQ that the run did not use add their modules to a submission's code, a few kB.

Prints one JSON line: the artifact's bytes, its schemes and, with ``--score``, val_bpb of the trained weights and
of the model reloaded from the new file. Exit status 0; 1 for bad input; 4 when the artifact is over the limit
(it is still written, to inspect).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from tgolf.config import add_config_arguments, env_overrides

EXPORT_FIELDS = ["export_scheme", "export_embed_scheme", "export_mlp_scheme", "export_fit", "export_fill",
                 "export_clip_search",
                 "export_clip_sigmas", "export_embed_clip_sigmas",
                 "export_lowrank_rank", "export_lowrank_embed_rank", "export_lowrank_scheme",
                 "export_entropy_coder", "gptq_tokens",
                 "gptq_calibration", "gptq_self_seq_len", "gptq_self_temperatures", "compressor",
                 "max_artifact_bytes"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tgolf.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trained", required=True, help="trained.pt written by a run with --save-trained")
    p.add_argument("--out", required=True, help="artifact file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--data", help="shards folder for GPTQ's calibration and --score (default: the run's data_path)")
    p.add_argument("--code-bytes", type=int, default=None,
                   help="code bytes counted towards the limit (default: the run's, from its summary.json, else 0)")
    p.add_argument("--score", action="store_true", help="score the trained and the reloaded model on the val shards")
    p.add_argument("--val-tokens-limit", type=int, default=None, help="--score: the first N val tokens (default: "
                                                                      "the run's setting; 0 = all)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    add_config_arguments(p, EXPORT_FIELDS)
    return p


def run_code_bytes(trained: Path) -> int:
    """``code_bytes`` of the run's summary.json beside ``trained``; 0 when there is none."""
    summary = trained.parent / "summary.json"
    if not summary.is_file():
        return 0
    value = json.loads(summary.read_text()).get("code_bytes", 0)
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{summary}: field 'code_bytes' is {value!r}, expected a non-negative integer")
    return value


def main(argv: list[str] | None = None) -> int:
    from tgolf.data.loader import TokenLoader, load_val_tokens
    from tgolf.data.tokenizer import build_byte_tables
    from tgolf.eval.bpb import evaluate
    from tgolf.export import BudgetExceeded, CodeBytes, load_artifact
    from tgolf.export.trained import load_trained
    from tgolf.train.distributed import DistEnv
    from tgolf.train.loop import grad_accum_steps
    from tgolf.train.logging import RunLogger
    from tgolf.train.run import export, gptq_hessians, resolve_data

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise ValueError(f"--out {out} already exists; pass --overwrite to replace it")
        if args.code_bytes is not None and args.code_bytes < 0:
            raise ValueError(f"--code-bytes={args.code_bytes}: must be >= 0")
        model, config = load_trained(args.trained)
        env = {name: value for name, value in env_overrides(os.environ).items() if name in EXPORT_FIELDS}
        flags = {name: getattr(args, name) for name in EXPORT_FIELDS if getattr(args, name) is not None}
        config = dataclasses.replace(config, **{**env, **flags}, data_path=args.data or config.data_path).validate()
        code_bytes = run_code_bytes(Path(args.trained)) if args.code_bytes is None else args.code_bytes
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    logger = RunLogger(None)
    dist_env = DistEnv(0, 1, 0, device)
    data_path, tokenizer_path = resolve_data(config, dist_env, logger)
    start = time.perf_counter()
    hessians = None
    if config.gptq_tokens:
        loader = (TokenLoader(data_path, seed=config.seed, vocab_size=config.vocab_size)
                  if config.gptq_calibration == "train" else None)
        hessians = gptq_hessians(config, model, loader, grad_accum_steps(config, 1), dist_env)
    try:
        info, (scheme, mlp_scheme, clip_sigmas) = export(config, model, out, hessians, logger,
                                                         fit_code_bytes=code_bytes)
    except BudgetExceeded as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    info = info.with_code(CodeBytes(total=code_bytes, files=()))
    record = {"artifact": str(out), "model_bytes": info.model_bytes, "code_bytes": code_bytes,
              "artifact_bytes": info.artifact_bytes, "limit": config.max_artifact_bytes,
              "fits": info.artifact_bytes <= config.max_artifact_bytes, "compressor": info.compressor,
              "entropy_coder": info.entropy_coder,
              "export_scheme": scheme, "export_mlp_scheme": mlp_scheme, "export_clip_sigmas": clip_sigmas,
              "export_embed_scheme": config.export_embed_scheme or config.export_scheme,
              "gptq_tensors": len(hessians or {}), "export_lowrank_rank": config.export_lowrank_rank,
              "export_lowrank_embed_rank": config.export_lowrank_embed_rank,
              "export_seconds": time.perf_counter() - start}
    if args.score:
        seq_len = config.eval_seq_len or config.train_seq_len
        limit = config.val_tokens_limit if args.val_tokens_limit is None else args.val_tokens_limit
        val = load_val_tokens(data_path, seq_len, limit, config.vocab_size)
        tables = build_byte_tables(tokenizer_path, config.vocab_size)
        reloaded, _ = load_artifact(out, device)
        before, after = (evaluate(m, val, seq_len, config.val_batch_size, tables, device, stride=config.eval_stride)
                         for m in (model, reloaded))
        record.update(val_bpb=before.val_bpb, roundtrip_val_bpb=after.val_bpb,
                      quantization_gap_bpb=after.val_bpb - before.val_bpb, val_tokens=before.tokens)
    print(json.dumps(record))
    if not record["fits"]:
        print(f"error: the artifact is {info.artifact_bytes:,} bytes (model {info.model_bytes:,} + code "
              f"{code_bytes:,}), over the {config.max_artifact_bytes:,}-byte limit", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
