"""The CUDA extension tgolf._C: built and registered (CPU), and each op against its twins (GPU)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import tgolf_build
from tgolf import _extension, backend
from tgolf._extension import (softcap_ce_chunk_reference, ternary_int8_linear_reference, ternary_int8_mm_reference,
                              ternary_packed_mm_reference)
from tgolf.ops.ternary.packing import pack2

SCHEMAS = {
    "ternary_packed_mm_cuda": "tgolf::ternary_packed_mm_cuda(Tensor x, Tensor packed, Tensor scales, int group_size)"
                              " -> Tensor",
    "ternary_int8_linear_cuda": "tgolf::ternary_int8_linear_cuda(Tensor x, Tensor codes, Tensor scales) -> Tensor",
    "ternary_int8_mm_cuda": "tgolf::ternary_int8_mm_cuda(Tensor xq, Tensor xscale, Tensor codes, Tensor scales) -> "
                            "Tensor",
    "softcap_ce_chunk_cuda": "tgolf::softcap_ce_chunk_cuda(Tensor(a!) logits, Tensor targets, float softcap, "
                             "float grad_scale) -> Tensor",
}


def _build_expected() -> bool:
    return tgolf_build.extension_plan()[0]


needs_ext = pytest.mark.skipif(not _build_expected(), reason="the CUDA extension is not built here "
                               f"({tgolf_build.extension_plan()[1]})")


# ------------------------------------------------------------------------------------------------------------ CPU

def test_extension_loads_where_it_was_built():
    """A toolkit + torch at install time means `pip install` compiled csrc/: a compile error fails install, and a
    missing or unloadable tgolf._C fails here."""
    if not _build_expected():
        pytest.skip(f"no build expected: {tgolf_build.extension_plan()[1]}")
    assert _extension.load(), f"tgolf._C did not load: {_extension.load_error()}"
    assert backend.cuda_extension() is not None


@needs_ext
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_op_registered_with_schema(name):
    assert backend.cuda_op(name) is not None
    assert str(getattr(torch.ops.tgolf, name).default._schema) == SCHEMAS[name]


@needs_ext
def test_error_messages_are_formed_and_raised():
    """The ops' checks build their messages with csrc/message.h (integers, shapes, dtypes, devices); a message
    that failed to form would crash the process here instead of raising."""
    _extension.load()
    with pytest.raises(RuntimeError, match=r"^value -100, shape \[2, 3, 0\], dtype BFloat16, device cpu\b"):
        torch.ops.tgolf.message_selftest(-100, [2, 3, 0], torch.bfloat16, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"^value 9007199254740993, shape \[\], dtype Char, device cuda:1\b"):
        torch.ops.tgolf.message_selftest(2**53 + 1, [], torch.int8, torch.device("cuda", 1))


@needs_ext
def test_fake_impls_give_shapes_and_dtypes():
    _extension.load()
    with FakeTensorMode():
        x = torch.empty(3, 100, dtype=torch.bfloat16, device="cuda")
        y = torch.ops.tgolf.ternary_packed_mm_cuda(x, torch.empty(7, 25, dtype=torch.uint8, device="cuda"),
                                                   torch.empty(7, 2, device="cuda"), 64)
        assert (y.shape, y.dtype, y.device.type) == ((3, 7), torch.bfloat16, "cuda")
        y = torch.ops.tgolf.ternary_int8_linear_cuda(x, torch.empty(9, 100, dtype=torch.int8, device="cuda"),
                                                     torch.empty(9, device="cuda"))
        assert (y.shape, y.dtype, y.device.type) == ((3, 9), torch.bfloat16, "cuda")
        y = torch.ops.tgolf.ternary_int8_mm_cuda(torch.empty(3, 100, dtype=torch.int8, device="cuda"),
                                                 torch.empty(3, device="cuda"),
                                                 torch.empty(9, 100, dtype=torch.int8, device="cuda"),
                                                 torch.empty(9, device="cuda"))
        assert (y.shape, y.dtype, y.device.type) == ((3, 9), torch.bfloat16, "cuda")
        for dtype in (torch.bfloat16, torch.float32):
            logits = torch.empty(5, 33, dtype=dtype, device="cuda")
            loss = torch.ops.tgolf.softcap_ce_chunk_cuda(logits, torch.empty(5, dtype=torch.long, device="cuda"),
                                                         30.0, 0.2)
            assert (loss.shape, loss.dtype, loss.device.type) == ((5,), torch.float32, "cuda")


@needs_ext
def test_torch_compile_traces_the_ops():
    """fullgraph torch.compile with dynamic shapes through all three ops; meta tensors stand in for CUDA ones (the
    Python fakes are their meta kernels), so it runs without a GPU."""
    _extension.load()

    def f(x, packed, scales, codes, wscales, logits, targets):
        a = torch.ops.tgolf.ternary_packed_mm_cuda(x, packed, scales, 0)
        b = torch.ops.tgolf.ternary_int8_linear_cuda(x, codes, wscales)
        c = torch.ops.tgolf.ternary_int8_mm_cuda(codes, wscales, codes, wscales)
        loss = torch.ops.tgolf.softcap_ce_chunk_cuda(logits, targets, 30.0, 1.0)
        return a.float() @ b.float().T, c, loss

    meta = dict(device="meta")
    args = (torch.empty(4, 64, dtype=torch.bfloat16, **meta), torch.empty(6, 16, dtype=torch.uint8, **meta),
            torch.empty(6, 1, **meta), torch.empty(6, 64, dtype=torch.int8, **meta), torch.empty(6, **meta),
            torch.empty(4, 10, **meta), torch.empty(4, dtype=torch.long, **meta))
    products, c, loss = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)(*args)
    assert products.shape == (4, 4) and c.shape == (6, 6) and loss.shape == (4,) and loss.dtype == torch.float32


@needs_ext
def test_cpu_tensors_are_rejected():
    x = torch.randn(2, 8).to(torch.bfloat16)
    with pytest.raises(NotImplementedError):
        torch.ops.tgolf.ternary_int8_linear_cuda(x, torch.zeros(3, 8, dtype=torch.int8), torch.ones(3))


_CPU_THROWS = """
import torch
from tgolf import _extension
_extension.load()
cuda_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)  # the CUDA kernels themselves, on CPU tensors
x, codes = torch.zeros(2, 8, dtype=torch.bfloat16), torch.zeros(3, 8, dtype=torch.int8)
calls = {
    "ternary_packed_mm_cuda": (x, torch.zeros(3, 2, dtype=torch.uint8), torch.ones(3, 1), 0),
    "ternary_int8_linear_cuda": (x, codes, torch.ones(3)),
    "ternary_int8_mm_cuda": (codes[:2], torch.ones(2), codes, torch.ones(3)),
    "softcap_ce_chunk_cuda": (torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), 30.0, 1.0),
}
for name, args in calls.items():
    try:
        getattr(torch.ops.tgolf, name).default.redispatch(cuda_kernel, *args)
        print(name, "no error")
    except RuntimeError as err:
        print(name, "raised:", str(err).splitlines()[0])
"""


@needs_ext
def test_the_extensions_checks_raise_through_torch_without_a_gpu():
    """Each CUDA kernel's first argument check, reached on CPU tensors through the CUDA dispatch key: the C++
    exception it throws must arrive in Python as a RuntimeError. On the first H100 run a throw from the extension
    built there crashed the process (test_cuda_ops_raise_clear_errors); this checks the same path in every build
    that CI makes, in a child process so that a crash fails this test only."""
    proc = subprocess.run([sys.executable, "-c", _CPU_THROWS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"crashed (exit status {proc.returncode}): {proc.stderr[-1500:]}"
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(SCHEMAS), proc.stdout
    assert all("raised:" in line and "must be a CUDA tensor, got device cpu" in line for line in lines), proc.stdout


# ------------------------------------------------------------------------------------------------------------ GPU

def _poison_cache() -> None:
    """Fill the caching allocator's free blocks with NaN so that unwritten outputs show up."""
    torch.full((1 << 24,), float("nan"), device="cuda")
    torch.cuda.synchronize()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _ternary(n: int, k: int, device="cuda") -> torch.Tensor:
    return torch.randint(-1, 2, (n, k), dtype=torch.int8, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,group_size", [
    (1, 4096, 4096, 0), (1, 40, 200, 0), (3, 33, 257, 64), (8, 128, 1024, 128), (13, 70, 383, 64),
    (17, 96, 512, 0), (33, 48, 130, 0), (64, 256, 768, 128), (65, 40, 256, 64), (150, 24, 64, 0),
])
def test_packed_mm_matches_reference(m, n, k, group_size):
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    codes = _ternary(n, k)
    groups = math.ceil(k / group_size) if group_size else 1
    scales = (torch.rand(n, groups, device="cuda") + 0.5).half().float()
    packed = pack2(codes)
    _poison_cache()
    out = torch.ops.tgolf.ternary_packed_mm_cuda(x, packed, scales, group_size)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _rel(out, ternary_packed_mm_reference(x, packed, scales, group_size)) < 4e-3


@pytest.mark.gpu
def test_packed_mm_unaligned_inputs():
    """Views whose data do not start on 16 bytes take the element-wise load paths."""
    m, n, k = 5, 36, 200
    x = torch.randn(m, k + 1, device="cuda").to(torch.bfloat16)[:, 1:]
    packed = torch.cat([torch.zeros(n, 1, dtype=torch.uint8, device="cuda"), pack2(_ternary(n, k))], 1)[:, 1:]
    scales = torch.rand(n, 1, device="cuda") + 0.5
    out = torch.ops.tgolf.ternary_packed_mm_cuda(x, packed, scales, 0)
    assert _rel(out, ternary_packed_mm_reference(x, packed, scales, 0)) < 4e-3


_BAD_CALL = """
import sys
import torch, tgolf
from tgolf import _extension
from tgolf.ops.ternary.packing import pack2
_extension.load()
x = torch.randn(2, 200, device="cuda").to(torch.bfloat16)
codes = torch.randint(-1, 2, (8, 200), dtype=torch.int8, device="cuda")
calls = {
    "group_size": lambda: torch.ops.tgolf.ternary_packed_mm_cuda(x, pack2(codes), torch.ones(8, 2, device="cuda"),
                                                                 100),
    "dtype": lambda: torch.ops.tgolf.ternary_packed_mm_cuda(x, pack2(codes), torch.ones(8, 1, device="cuda").double(),
                                                            0),
    "shape": lambda: torch.ops.tgolf.ternary_int8_linear_cuda(x, codes[:, :100], torch.ones(8, device="cuda")),
    "layout": lambda: torch.ops.tgolf.softcap_ce_chunk_cuda(torch.randn(4, 6, device="cuda").t(),
                                                            torch.zeros(6, dtype=torch.long, device="cuda"), 30.0, 1.0),
}
try:
    calls[sys.argv[1]]()
    print("no error")
except RuntimeError as err:
    print("raised:", str(err).splitlines()[0])
"""


@pytest.mark.gpu
@pytest.mark.parametrize("case, fragment", [("group_size", "group_size must be"), ("dtype", "scales must have dtype"),
                                            ("shape", "codes must be [N, K]"), ("layout", "contiguous 2-D")])
def test_cuda_ops_raise_clear_errors(case, fragment):
    # Each call in a child process: on both GPU runs (2026-11-27 H100, 2026-11-28 H200; torch 2.11, extension built
    # there) the calls whose message wrote an integer crashed with a segmentation fault inside the ostringstream of
    # TORCH_CHECK, and only "dtype" raised. The messages are now built without streams (csrc/message.h); a crash
    # still fails its own case only.
    proc = subprocess.run([sys.executable, "-c", _BAD_CALL, case], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"crashed (exit status {proc.returncode}): {proc.stderr[-1500:]}"
    assert proc.stdout.startswith("raised:") and fragment in proc.stdout, proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 24, 100), (5, 136, 512), (128, 128, 64), (130, 72, 520), (300, 1536, 512),
                                   (257, 512, 1536), (64, 33, 77)])
def test_int8_linear_is_bit_exact(m, n, k):
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    x[0] = 0  # all-zero token: the absmax floor
    if m > 2:
        x[1] *= 1e4
    codes = _ternary(n, k)
    scales = (torch.rand(n, device="cuda") + 0.5).half().float()
    _poison_cache()
    out = torch.ops.tgolf.ternary_int8_linear_cuda(x, codes, scales)
    assert torch.equal(out, ternary_int8_linear_reference(x, codes, scales))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 24, 100), (130, 72, 520), (300, 1536, 512), (257, 512, 1536)])
def test_int8_mm_is_bit_exact(m, n, k):
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    xscale = torch.rand(m, device="cuda")
    codes = _ternary(n, k)
    scales = (torch.rand(n, device="cuda") + 0.5).half().float()
    _poison_cache()
    out = torch.ops.tgolf.ternary_int8_mm_cuda(xq, xscale, codes, scales)
    assert torch.equal(out, ternary_int8_mm_reference(xq, xscale, codes, scales))


@pytest.mark.gpu
def test_int8_linear_unaligned_inputs():
    m, n, k = 7, 40, 96
    x = torch.randn(m, k + 1, device="cuda").to(torch.bfloat16)[:, 1:]
    codes = torch.cat([torch.zeros(n, 1, dtype=torch.int8, device="cuda"), _ternary(n, k)], 1)[:, 1:]
    scales = torch.rand(n, device="cuda") + 0.5
    out = torch.ops.tgolf.ternary_int8_linear_cuda(x, codes, scales)
    assert torch.equal(out, ternary_int8_linear_reference(x, codes, scales))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,vocab,softcap", [(7, 1024, 30.0), (3, 8192, 30.0), (5, 1001, 30.0), (4, 1000, 0.0),
                                             (2, 50, 15.0)])
def test_softcap_ce_matches_reference(dtype, n, vocab, softcap):
    logits = (torch.randn(n, vocab, device="cuda") * 12).to(dtype)
    targets = torch.randint(0, vocab, (n,), device="cuda")
    expected = logits.clone()
    ref_loss = softcap_ce_chunk_reference(expected, targets, softcap, 0.25)
    _poison_cache()
    loss = torch.ops.tgolf.softcap_ce_chunk_cuda(logits, targets, softcap, 0.25)
    assert _rel(loss, ref_loss) < 1e-5
    assert _rel(logits, expected) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
def test_softcap_ce_out_of_range_target_gives_nan_loss():
    logits = torch.randn(3, 64, device="cuda")
    loss = torch.ops.tgolf.softcap_ce_chunk_cuda(logits, torch.tensor([1, -100, 64], device="cuda"), 30.0, 1.0)
    assert torch.isfinite(loss[0]) and loss[1:].isnan().all()


@pytest.mark.gpu
def test_cuda_ops_against_triton_twins(monkeypatch):
    """Same inputs through the CUDA ops and the families' Triton kernels."""
    from tgolf.kernels.loss import softcap_ce_chunk
    from tgolf.ops.ternary import int8_linear, packed_matmul

    monkeypatch.setenv("TGOLF_BACKEND", "triton")
    x = torch.randn(9, 320, device="cuda").to(torch.bfloat16)
    codes = _ternary(96, 320)
    scales = (torch.rand(96, 1, device="cuda") + 0.5).half().float()
    cuda_out = torch.ops.tgolf.ternary_packed_mm_cuda(x, pack2(codes), scales, 0)
    assert _rel(cuda_out, packed_matmul(x, pack2(codes), scales, 320)) < 1e-2
    cuda_out = torch.ops.tgolf.ternary_int8_linear_cuda(x, codes, scales[:, 0].contiguous())
    assert _rel(cuda_out, int8_linear(x, codes, scales)) < 1e-2
    logits = torch.randn(6, 1024, device="cuda") * 10
    targets = torch.randint(0, 1024, (6,), device="cuda")
    other = logits.clone()
    loss = torch.ops.tgolf.softcap_ce_chunk_cuda(logits, targets, 30.0, 0.5)
    assert _rel(loss, softcap_ce_chunk(other, targets, 30.0, 0.5)) < 1e-5 and _rel(logits, other) < 1e-5


@pytest.mark.gpu
def test_opcheck_and_compile():
    """torch.library.opcheck (schema, fakes, aliasing) and a fullgraph torch.compile through the ops."""
    x = torch.randn(4, 128, device="cuda").to(torch.bfloat16)
    codes = _ternary(16, 128)
    scales = torch.rand(16, 1, device="cuda") + 0.5
    logits = torch.randn(4, 96, device="cuda")
    targets = torch.randint(0, 96, (4,), device="cuda")
    torch.library.opcheck(torch.ops.tgolf.ternary_packed_mm_cuda.default, (x, pack2(codes), scales, 0))
    torch.library.opcheck(torch.ops.tgolf.ternary_int8_linear_cuda.default, (x, codes, scales[:, 0].contiguous()))
    torch.library.opcheck(torch.ops.tgolf.ternary_int8_mm_cuda.default,
                          (codes[:4].contiguous(), scales[:4, 0].contiguous(), codes, scales[:, 0].contiguous()))
    torch.library.opcheck(torch.ops.tgolf.softcap_ce_chunk_cuda.default, (logits.clone(), targets, 30.0, 1.0))

    packed = pack2(codes)

    def f(x, logits):
        y = torch.ops.tgolf.ternary_packed_mm_cuda(x, packed, scales, 0)
        return y, torch.ops.tgolf.softcap_ce_chunk_cuda(logits, targets, 30.0, 1.0)

    eager_logits, compiled_logits = logits.clone(), logits.clone()
    y_ref, loss_ref = f(x, eager_logits)
    y, loss = torch.compile(f, fullgraph=True, backend="aot_eager")(x, compiled_logits)
    assert torch.equal(y, y_ref) and torch.equal(loss, loss_ref) and torch.equal(compiled_logits, eager_logits)
