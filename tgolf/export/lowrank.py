"""A low-rank correction of a quantized matrix's rounding error, stored beside its codes in a few low-bit bytes.

Rounding leaves an error E = W - dequantize(codes). The best record (openai/parameter-golf, 1.0611, April 2026)
stores a low-rank int4 approximation of it next to its GPTQ int6 codes; the reload adds it back. Here the matrix
stored is ``dequantize(codes) + upᵀ · down`` with ``up`` [r, N] and ``down`` [r, K], each per-row int<bits>:

1. ``up`` spans E's r leading left singular vectors (each scaled by the root of its singular value). With GPTQ's
   input second moment H (calibrated runs) the singular vectors are those of E·L, where H = L·Lᵀ, so they
   are the directions that move the layer's *outputs* on real inputs the most (‖E·X‖² = ‖E·L‖² summed over
   the calibration rows), not those of E's entries.
2. ``up`` is rounded first; ``down`` is then the least-squares fit of E given the rounded ``up`` (the same
   solution whatever H is: the residual is orthogonal to ``up``'s columns), so it absorbs ``up``'s rounding, and is
   rounded itself, with GPTQ when H is known.

Cost: r·(N + K) codes and 2r fp16 scales. Rank 8 on a 512×1536 matrix is 16,384 int4 codes, 8 KB before
compression, about 1.6% of that matrix's int6 bytes (5.35 bits a weight compressed, tgolf.export.format). Rounding
error is close to noise, so a rank-r term removes little of its squared size: on N(0, 0.02) weights of that shape
rounded to int6, 3.7% at rank 8 and 13.9% at rank 32, int4 factors included (2.2–2.4 times r / min(N, K)). Its value
is in aiming at what the layer's outputs feel, which only GPTQ's H tells: measure the score it buys against the
bytes it costs (the README's table).
"""
from __future__ import annotations

import torch

from tgolf.export.gptq import damped_hessian, gptq_quantize
from tgolf.export.quantize import CLIP_SEARCH_QUANTILES, QuantTensor, int_bits, quantize_rows


def lowrank_correction(weight: torch.Tensor, dequantized: torch.Tensor, rank: int, scheme: str = "int4",
                       hessian: torch.Tensor | None = None) -> tuple[QuantTensor, QuantTensor]:
    """``(up [r, N], down [r, K])`` as ``scheme`` QuantTensors, r = min(rank, N, K), such that
    ``dequantized + up.dequantize().T @ down.dequantize()`` is closer to ``weight`` [N, K] (see the module
    docstring; ``hessian`` [K, K] weights the error by the layer's inputs)."""
    bits = int_bits(scheme, "lowrank scheme")
    if rank <= 0:
        raise ValueError(f"rank={rank}: must be > 0")
    n, k = weight.shape
    if tuple(dequantized.shape) != (n, k):
        raise ValueError(f"dequantized: shape {tuple(dequantized.shape)}, expected {(n, k)} like the weight")
    rank = min(rank, n, k)
    error = weight.detach().double().cpu() - dequantized.detach().double().cpu()
    target = error
    if hessian is not None:
        if tuple(hessian.shape) != (k, k):
            raise ValueError(f"hessian: shape {tuple(hessian.shape)}, expected {(k, k)} for a weight of shape {(n, k)}")
        target = error @ torch.linalg.cholesky(damped_hessian(hessian, "cpu"))
    u, s, _ = torch.linalg.svd(target, full_matrices=False)
    left, singular = u[:, :rank], s[:rank]
    up_codes, up_scales = quantize_rows((left * singular.sqrt()).T.float(), bits, None, CLIP_SEARCH_QUANTILES)
    up = QuantTensor(scheme, (rank, n), codes=up_codes, scales=up_scales)
    # down: least squares of the error given the rounded up (pinv: a row of up may have rounded to zero)
    down_float = torch.linalg.pinv(up.dequantize().double().T) @ error
    down_codes, down_scales = quantize_rows(down_float.float(), bits, None, CLIP_SEARCH_QUANTILES)
    if hessian is not None:
        down_codes = gptq_quantize(down_float.float(), hessian, down_scales, bits).cpu()
    return up, QuantTensor(scheme, (rank, k), codes=down_codes, scales=down_scales)


__all__ = ["lowrank_correction"]
