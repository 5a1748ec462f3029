"""Measure what the rANS entropy coder saves on an artifact's own integer codes.

    python -m tgolf.export.measure_codes runs/my_run/model.tgz [more artifacts ...]

For each artifact: per quantized matrix, bits a code for the codes' order-0 entropy (the floor of any coder that
sees codes one at a time, without groups), for the "rans" buffer, and for the codes without it: brotli-11 over
them as bytes for an int matrix, the "trits" packing (which no compressor shrinks) for a ternary one; then the
whole model file compressed by each general compressor, without ("none") and with ("rans") the coder, which is the
comparison an export makes. The artifact is read, never written.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tgolf.export.artifact import read_artifact
from tgolf.export.compress import available_compressors, compress_all
from tgolf.export.format import quantized_parts, serialize
from tgolf.export.packing import packed_trits_length
from tgolf.export.quantize import QuantTensor
from tgolf.export.rans import order0_bits, rans_encode


def bytes_without_rans(qt: QuantTensor) -> int:
    """What the codes take without the coder: "trits" for ternary, else brotli-11 over the int8 bytes."""
    import brotli

    if qt.scheme == "ternary":
        return packed_trits_length(qt.numel)
    return len(brotli.compress(qt.codes.numpy().tobytes(), quality=11))  # int8 codes, one byte each


def measure(path: Path) -> dict:
    """Per-matrix and whole-file figures for one artifact (see the module docstring)."""
    tensors, config, meta = read_artifact(path)
    parts = quantized_parts(tensors)
    buffers = rans_encode([qt.codes.numpy() for qt in parts.values()])
    rows = []
    for (name, qt), buf in zip(parts.items(), buffers):
        per_code = 1 / max(qt.numel, 1)
        rows.append({"tensor": name, "scheme": qt.scheme, "codes": qt.numel,
                     "entropy": order0_bits(qt.codes) * per_code, "rans": 8 * len(buf) * per_code,
                     "without": 8 * bytes_without_rans(qt) * per_code})
    files = {}
    for coder in ("none", "rans"):
        blob = serialize(tensors, config, meta, entropy_code=coder == "rans")
        files[coder] = {name: len(c) for name, c in compress_all(blob, available_compressors()).items()}
    return {"artifact": str(path), "matrices": rows, "model_bytes": files}


def report(result: dict) -> str:
    lines = [f"## {result['artifact']}", "", "bits a code:", "",
             "| matrix | scheme | codes | entropy | rans | without (brotli-11, or trits) |", "|---|---|---|---|---|---|"]
    for r in result["matrices"]:
        lines.append(f"| {r['tensor']} | {r['scheme']} | {r['codes']:,} | {r['entropy']:.4f} | {r['rans']:.4f} | "
                     f"{r['without']:.4f} |")
    lines += ["", "| compressor | model bytes, codes as bytes | model bytes, rANS | change |", "|---|---|---|---|"]
    none, rans = result["model_bytes"]["none"], result["model_bytes"]["rans"]
    for name in none:
        lines.append(f"| {name} | {none[name]:,} | {rans[name]:,} | {100 * (rans[name] / none[name] - 1):+.2f}% |")
    lines.append(f"| smallest | {min(none.values()):,} | {min(rans.values()):,} | "
                 f"{100 * (min(rans.values()) / min(none.values()) - 1):+.2f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tgolf.export.measure_codes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+", type=Path, help="artifact files (model.tgz) to measure")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    results = [measure(path) for path in args.artifacts]
    print("\n\n".join(report(r) for r in results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
