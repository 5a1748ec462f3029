"""Measure how many bits a ternary weight costs in the artifact: codes and scales, before and after compression.

    python -m tgolf.export.measure_ternary            # the contest shapes, N(0, 0.02) weights, per row and groups
    python -m tgolf.export.measure_ternary --speed    # also time pack/unpack of a 65M-code tensor on this CPU
    python -m tgolf.export.measure_ternary --codes F  # also every (codes, scales) pair in a torch.save'd dict
                                                      # {name: (codes int8 [N, K], scales f32 [N, G])}
    python -m tgolf.export.measure_ternary --codes F --mantissa 6   # what-if, see below

Figures are bits per ternary weight: ``codes`` (the "trits" buffer), ``scales`` (the buffer the writer chose,
"adaptive" or "fp16"), ``packed`` = their sum, the payload of a one-tensor model file before any general
compressor (the file's JSON header is left out: it is shared by the whole model); ``best`` = the smallest of
zlib / lzma / brotli / zstd on that payload; ``v1`` = the version-1 layout (five codes per byte, fp16 scales)
before compression; ``bits/scale`` = the scales buffer over the number of scales.
Weights are absmean-quantized by ``tgolf.ops.ternary.reference.quantize_ternary``, as TernaryLinear does.

``--mantissa M`` is a what-if, not what tgolf exports: it rounds every scale to M explicit mantissa bits (fp16
has 10) before packing, to show what a quantizer with coarser scales would pay; the codes are left as they were.
"""
from __future__ import annotations

import argparse
import time

import torch

from tgolf.export.compress import compress
from tgolf.export.format import deserialize, serialize
from tgolf.export.packing import pack_base3, pack_trits, unpack_trits
from tgolf.export.quantize import QuantTensor
from tgolf.ops.ternary.reference import quantize_ternary

SHAPES = ((512, 1536), (1536, 512), (512, 512), (768, 3072))  # (K = in_features, N = out_features)
GROUPS = (None, 128)


def measure(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> dict[str, float | str]:
    """Bits per weight of one ternary tensor in the model file (checked to load back bit for bit)."""
    n, k = codes.shape
    blob = serialize({"w": QuantTensor("ternary", (n, k), codes=codes, scales=scales, group_size=group_size)}, {})
    back = deserialize(blob)[0]["w"]
    if not (torch.equal(back.codes, codes) and torch.equal(back.scales, scales.float())):
        raise AssertionError("the model file did not load back bit for bit")
    header_len = int.from_bytes(blob[12:20], "little")
    payload = blob[20 + header_len:]
    codes_bytes = pack_trits(codes).numel()
    per_weight = 8 / codes.numel()
    v1 = pack_base3(codes).numel() + 2 * scales.numel()
    entry_coding = "adaptive" if len(payload) - codes_bytes < 2 * scales.numel() else "fp16"
    return {"codes": codes_bytes * per_weight, "scales": (len(payload) - codes_bytes) * per_weight,
            "packed": len(payload) * per_weight, "best": len(compress(payload, "best")[0]) * per_weight,
            "v1": v1 * per_weight, "coding": entry_coding,
            "scale_bits": (len(payload) - codes_bytes) * 8 / scales.numel()}


def round_mantissa(scales: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Scales rounded (half to even) to ``bits`` explicit mantissa bits; None leaves them as they are."""
    if bits is None:
        return scales
    mantissa, exponent = torch.frexp(scales.double())  # scales = mantissa * 2^exponent, 0.5 <= mantissa < 1
    step = 2.0 ** (bits + 1)
    return torch.ldexp(torch.round(mantissa * step) / step, exponent).half().float()


def _row(name: str, shape: tuple[int, int], group_size: int | None, m: dict) -> str:
    return (f"{name:24s} {shape[1]:5d} {shape[0]:5d} {str(group_size):>5s} {m['codes']:.4f} {m['scales']:.4f} "
            f"{m['packed']:.4f} {m['best']:.4f} {m['v1']:.4f}  {m['coding']:8s} {m['scale_bits']:.2f}")


HEADER = (f"{'tensor':24s} {'K':>5s} {'N':>5s} {'group':>5s} {'codes':6s} {'scales':6s} {'packed':6s} "
          f"{'best':6s} {'v1':6s}  {'coding':8s} bits/scale")


def synthetic(seed: int = 0, mantissa: int | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    print(HEADER)
    for k, n in SHAPES:
        w = torch.randn(n, k, generator=gen) * 0.02
        for group_size in GROUPS:
            codes, scales = quantize_ternary(w, group_size)
            scales = round_mantissa(scales, mantissa)
            print(_row("N(0, 0.02)", (n, k), group_size, measure(codes, scales, group_size)), flush=True)


def from_file(path: str, mantissa: int | None = None) -> None:
    print(HEADER)
    for name, (codes, scales) in torch.load(path).items():
        n, k = codes.shape
        groups = scales.shape[1]
        group_size = None if groups == 1 else -(-k // groups)
        scales = round_mantissa(scales, mantissa)
        print(_row(name, (n, k), group_size, measure(codes, scales, group_size)), flush=True)


def speed(n: int = 65_000_017) -> None:
    codes = torch.randint(-1, 2, (n,), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    packed = pack_trits(codes)
    middle = time.perf_counter()
    back = unpack_trits(packed, n)
    end = time.perf_counter()
    assert torch.equal(back, codes)
    print(f"pack_trits {n:,} codes: {middle - start:.2f} s, unpack_trits: {end - middle:.2f} s, "
          f"{packed.numel() * 8 / n:.5f} bits a code")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", action="store_true", help="time pack/unpack of a 65M-code tensor")
    parser.add_argument("--codes", action="append", default=[], help="torch.save'd {name: (codes, scales)}")
    parser.add_argument("--mantissa", type=int, default=None, choices=range(11),
                        help="what-if: round the scales to this many mantissa bits first")
    args = parser.parse_args()
    if args.mantissa is not None:
        print(f"WHAT-IF: scales rounded to {args.mantissa} mantissa bits (tgolf keeps all 10)")
    synthetic(mantissa=args.mantissa)
    for path in args.codes:
        from_file(path, args.mantissa)
    if args.speed:
        speed()


if __name__ == "__main__":
    main()
