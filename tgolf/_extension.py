"""Loading of the optional CUDA extension ``tgolf._C`` and the fake implementations of its ops.

The ops (all CUDA-only, called by the op families through ``tgolf.backend.cuda_op(name)``):

``ternary_packed_mm_cuda(x, packed, scales, group_size) -> out``
    x bf16 [M, K]; packed uint8 [N, ceil(K/4)]: code c in {-1, 0, 1} stored as c + 1, four per byte along K,
    code k at bits 2*(k % 4) of byte k // 4, the last byte padded with 1s (zero codes); scales float32 [N, G]
    (group_size 0: G = 1; else G = ceil(K / group_size), group_size a multiple of 64).
    out bf16 [M, N] = x @ (codes * scales).T with fp32 accumulation (tensor cores, the 2-bit codes decoded in
    registers). Meant for M = 1..64 (decoding, evaluation); any M works.
``ternary_int8_linear_cuda(x, codes, scales) -> out``
    x bf16 [M, K]; codes int8 [N, K] (any int8, ternary in use); scales float32 [N]. x is quantized per token
    exactly like ``tgolf.ops.ternary.reference.quantize_activations_int8`` (amax = max(max|x_m|, 2^-64) in
    float64; inv = float32((1 / amax) * 127); q = round_half_even(x * inv) on the exact product;
    xscale = float32(amax / 127)); acc = q @ codes.T in int32 (exact);
    out bf16 [M, N] = bf16((float32(acc) * scales[n]) * xscale[m]), each product rounded to fp32 (the order of
    the ternary family's reference).
``ternary_int8_mm_cuda(xq, xscale, codes, scales) -> out``
    The same GEMM and epilogue with x already quantized: xq int8 [M, K], xscale float32 [M] (for instance from
    ``quantize_activations_int8``, whose codes the backward reuses); out bf16 [M, N].
``softcap_ce_chunk_cuda(logits, targets, softcap, grad_scale) -> loss``
    logits [n, V] bf16 or fp32 (raw, contiguous), targets int64 [n]; z = softcap * tanh(logits / softcap)
    (softcap <= 0: z = logits); returns loss float32 [n] = logsumexp(z) - z[target] and overwrites logits IN PLACE
    with grad_scale * (softmax(z) - onehot(target)) * (1 - tanh^2(logits / softcap)). A target outside [0, V)
    gives a NaN loss.

Beside them, ``message_selftest(value, shape, dtype, device)`` (no tensors, any machine) always raises the error
message the ops' argument checks would write for those values: the tests check that messages form and raise
where the extension was built (csrc/message.h says why that was in doubt on the GPU machines).

``tgolf._C`` imports this module when it loads (see csrc/ops.cpp), and this module imports ``tgolf._C`` unless
its ops are already registered, so the fakes exist whichever is imported first and there is no import cycle.
``python -m tgolf._extension selftest`` runs one small case of each op on the GPU against the references below
(for ``compute-sanitizer --tool memcheck``).
"""
from __future__ import annotations

import importlib
import sys

import torch

OP_NAMES = ("ternary_packed_mm_cuda", "ternary_int8_linear_cuda", "ternary_int8_mm_cuda", "softcap_ce_chunk_cuda")

_load_error: str | None = None


def ops_registered() -> bool:
    """True once the shared library's static initializers have registered every op."""
    namespace = getattr(torch.ops, "tgolf")
    return all(hasattr(namespace, name) for name in OP_NAMES)


def _register_fakes() -> None:
    # Checked on the dispatcher, not a module flag: `python -m tgolf._extension` runs a second copy of this module.
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"tgolf::{OP_NAMES[0]}", "Meta"):
        return

    @torch.library.register_fake("tgolf::ternary_packed_mm_cuda")
    def _(x, packed, scales, group_size):
        return x.new_empty((x.shape[0], packed.shape[0]))

    @torch.library.register_fake("tgolf::ternary_int8_linear_cuda")
    def _(x, codes, scales):
        return x.new_empty((x.shape[0], codes.shape[0]))

    @torch.library.register_fake("tgolf::ternary_int8_mm_cuda")
    def _(xq, xscale, codes, scales):
        return xq.new_empty((xq.shape[0], codes.shape[0]), dtype=torch.bfloat16)

    @torch.library.register_fake("tgolf::softcap_ce_chunk_cuda")
    def _(logits, targets, softcap, grad_scale):
        return logits.new_empty((logits.shape[0],), dtype=torch.float32)


def load() -> bool:
    """Load ``tgolf._C`` and register the fakes; False (see :func:`load_error`) when it is not available."""
    global _load_error
    if not ops_registered():
        try:
            importlib.import_module("tgolf._C")
        except ImportError as exc:
            _load_error = f"{type(exc).__name__}: {exc}"
            return False
    _register_fakes()
    return True


def load_error() -> str | None:
    """Why ``tgolf._C`` could not be imported (None when it loaded or was not tried)."""
    return _load_error


# --- PyTorch twins: what the CUDA ops are tested against (built on the op families' references) -------------


def ternary_packed_mm_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                                group_size: int) -> torch.Tensor:
    """x @ (codes * scales).T in float64, rounded to bf16."""
    from tgolf.ops.ternary.packing import unpack2

    k = x.shape[1]
    codes = unpack2(packed, k).double()
    per_column = scales.double().repeat_interleave(group_size if group_size > 0 else k, dim=1)[:, :k]
    return (x.double() @ (codes * per_column).T).to(torch.bfloat16)


def ternary_int8_linear_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Bit-exact twin of ternary_int8_linear_cuda (same quantizer, exact integer sums, same fp32 products)."""
    from tgolf.ops.ternary.reference import quantize_activations_int8

    return ternary_int8_mm_reference(*quantize_activations_int8(x), codes, scales)


def ternary_int8_mm_reference(xq: torch.Tensor, xscale: torch.Tensor, codes: torch.Tensor,
                              scales: torch.Tensor) -> torch.Tensor:
    """Bit-exact twin of ternary_int8_mm_cuda."""
    acc = (xq.double() @ codes.double().T).float()  # exact: |acc| <= 127 K < 2^24 for ternary codes
    return ((acc * scales[None, :]) * xscale[:, None]).to(torch.bfloat16)


def softcap_ce_chunk_reference(logits: torch.Tensor, targets: torch.Tensor, softcap: float,
                               grad_scale: float) -> torch.Tensor:
    """The loss family's reference computed in float64 (in place on ``logits``, like the op)."""
    from tgolf.ops.loss.reference import softcap_ce_chunk_reference as reference

    wide = logits.double()
    loss = reference(wide, targets, softcap, grad_scale)
    logits.copy_(wide)
    return loss.float()


def selftest(seed: int = 0) -> None:
    """One small, awkward-shaped case of each op on the GPU against its twin, and one bad call that must raise
    (for compute-sanitizer runs)."""
    if not load():
        raise SystemExit(f"tgolf._C is not available: {load_error()}")
    if not torch.cuda.is_available():
        raise SystemExit("selftest needs a CUDA GPU")
    from tgolf.ops.ternary.packing import pack2

    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    for m, n, k, group_size in ((1, 40, 200, 0), (13, 33, 257, 64), (70, 17, 128, 128)):
        x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
        codes = torch.randint(-1, 2, (n, k), device=dev, generator=gen, dtype=torch.int8)
        g = -(-k // group_size) if group_size else 1
        scales = torch.rand(n, g, device=dev, generator=gen) + 0.5
        packed = pack2(codes)
        out = torch.ops.tgolf.ternary_packed_mm_cuda(x, packed, scales, group_size)
        ref = ternary_packed_mm_reference(x, packed, scales, group_size)
        _report("ternary_packed_mm_cuda", (m, n, k, group_size), out, ref, 4e-3)
    try:  # a bad argument raises a clear error (see csrc/message.h for the crash this once was)
        torch.ops.tgolf.ternary_packed_mm_cuda(x, packed, scales, 100)
    except RuntimeError as err:
        print(f"ternary_packed_mm_cuda with group_size 100 raised: {str(err).splitlines()[0]}")
    else:
        raise SystemExit("ternary_packed_mm_cuda accepted group_size 100")
    for m, n, k in ((3, 24, 100), (130, 136, 512)):
        x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
        codes = torch.randint(-1, 2, (n, k), device=dev, generator=gen, dtype=torch.int8)
        scales = torch.rand(n, device=dev, generator=gen) + 0.5
        out = torch.ops.tgolf.ternary_int8_linear_cuda(x, codes, scales)
        _report("ternary_int8_linear_cuda", (m, n, k), out, ternary_int8_linear_reference(x, codes, scales), 0.0)
        xq = torch.randint(-127, 128, (m, k), device=dev, generator=gen, dtype=torch.int8)
        xscale = torch.rand(m, device=dev, generator=gen)
        out = torch.ops.tgolf.ternary_int8_mm_cuda(xq, xscale, codes, scales)
        _report("ternary_int8_mm_cuda", (m, n, k), out, ternary_int8_mm_reference(xq, xscale, codes, scales), 0.0)
    for dtype, n, v in ((torch.bfloat16, 5, 1000), (torch.float32, 3, 1027)):
        logits = (torch.randn(n, v, device=dev, generator=gen) * 20).to(dtype)
        targets = torch.randint(0, v, (n,), device=dev, generator=gen)
        expected = logits.clone()
        ref_loss = softcap_ce_chunk_reference(expected, targets, 30.0, 0.5)
        loss = torch.ops.tgolf.softcap_ce_chunk_cuda(logits, targets, 30.0, 0.5)
        _report("softcap_ce_chunk_cuda loss", (str(dtype), n, v), loss, ref_loss, 1e-5)
        _report("softcap_ce_chunk_cuda grad", (str(dtype), n, v), logits, expected,
                1e-5 if dtype == torch.float32 else 1e-2)
    torch.cuda.synchronize()


def _report(name: str, case: tuple, out: torch.Tensor, ref: torch.Tensor, tolerance: float) -> None:
    diff = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    print(f"{name} {case}: relative error {diff:.2e} (tolerance {tolerance:.0e})")
    if not diff <= tolerance:
        raise SystemExit(f"{name} {case}: relative error {diff:.2e} above {tolerance:.0e}")


load()

if __name__ == "__main__":
    if sys.argv[1:] != ["selftest"]:
        raise SystemExit("usage: python -m tgolf._extension selftest")
    selftest()
