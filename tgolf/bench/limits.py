"""The H100 SXM limits every speed figure is compared against (BRIEF §2, NVIDIA datasheet, dense rates).

One place for these numbers: the benchmarks report % of them and the profiler's MFU divides by the bf16 peak.
Measured ceilings on the lent H100 (an 8192³ bf16 GEMM ≈ 798 TFLOP/s, a device copy ≈ 3.0 TB/s) are lower;
the datasheet figures are what the reports quote so that every table shares one denominator.
"""
from __future__ import annotations

H100_NAME = "H100 SXM (datasheet, dense)"
H100_PEAK_FLOPS = {
    "bf16": 989e12,
    "fp16": 989e12,
    "tf32": 494e12,
    "fp8": 1979e12,
    "int8": 1979e12,
}
H100_HBM_BYTES_PER_S = 3.35e12
H100_L2_BYTES = 50 * 2**20


def peak_flops(precision: str) -> float:
    """Dense tensor-core peak for ``precision`` (bf16, fp16, tf32, fp8, int8) in FLOP/s."""
    try:
        return H100_PEAK_FLOPS[precision]
    except KeyError:
        raise ValueError(f"precision={precision!r}: expected one of {sorted(H100_PEAK_FLOPS)}") from None
