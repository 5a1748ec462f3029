"""Compile for sm_90 (H100) every distinct Triton launch that the kernels' launch helpers make: no GPU needed.

Run as ``python tests/_sm90_launches.py`` from the repository root WITHOUT TRITON_INTERPRET (the interpreter
replaces the kernels by interpreted functions and never compiles); tests/test_kernels_compile.py does that and
checks the JSON this prints. The CPU interpreter runs the kernels but skips the GPU compiler, so compile-only errors
(tl.dot dtype rules, layouts, ptxas limits) and lost tensor-core paths are only seen here.

How: ``JITFunction.run`` and ``Autotuner.run`` are replaced by recorders, the launch helpers of every family are
called with CPU tensors of contest-like shapes (their GPU branch: nothing runs), and each recorded launch is
specialised by Triton's own launch-time binder (ints equal to 1 become constexprs, ints and pointers divisible by 16
get tt.divisibility) and compiled (PTX and cubin) once per distinct (kernel, signature, constexprs, attributes,
options), into a fresh Triton cache so that ptxas reports each launch's registers and spills; shared memory comes
from Triton's metadata. Every @triton.jit function in the kernels package must be launched or called from a launched kernel.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import pkgutil
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from types import FunctionType
from typing import Any

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter never compiles")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import tgolf.kernels as kernels_pkg  # noqa: E402
from tgolf.kernels import linear_attention as kla  # noqa: E402
from tgolf.kernels import loss as kl  # noqa: E402
from tgolf.kernels import mlp as km  # noqa: E402
from tgolf.kernels import quant as kq  # noqa: E402
from tgolf.kernels import ternary as kt  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = (torch.bfloat16, torch.float32)
Launch = tuple[JITFunction, tuple, dict]  # (kernel, positional args, keyword args incl. num_warps / num_stages)


# ------------------------------------------------------------------------------------------------ recording

@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Launches made inside the block are recorded, not run; an autotuned launch is recorded once per config."""
    launches: list[Launch] = []
    saved = JITFunction.run, Autotuner.run

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    def tuner_run(self, *args, grid, warmup, **kwargs):
        launches.extend((self.fn, args, {**kwargs, **cfg.all_kwargs()}) for cfg in self.configs)

    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


# Exact fp32 dots (PRECISION / PREC "ieee") have no tensor-core path and take many times longer to compile than bf16
# ones; fp32 is a correctness path, not the contest's hot path, so each GEMM kernel with such a branch gets ONE fp32
# launch (on the smallest tile its helper picks) to cover it, while bf16 gets the whole grid.

def launch_ternary() -> None:
    """Per-row and per-group scales; large- and small-batch (m ≤ 64) GEMM tiles; int8 and 2-bit packed codes."""
    m, k, n = 200, 384, 320
    for dtype in FLOATS:
        w, bias = randn(n, k, dtype=dtype), randn(n)
        for group_size in (k, 64):
            codes, scales, packed = kt.quantize_weight(w, group_size)
            xq, xs = kt.quantize_activations(randn(m, k, dtype=dtype))
            kt.int8_mm(xq, xs, codes, scales, group_size, dtype, bias=bias)
            for rows in (m, 16) if dtype == torch.bfloat16 else ():
                x = randn(rows, k, dtype=dtype)
                kt.ternary_mm(x, codes, scales, group_size, kt.MODE_FORWARD, k, bias=bias)
                kt.ternary_mm(x, packed, scales, group_size, kt.MODE_PACKED, k, bias=bias)
                kt.ternary_mm(randn(rows, n, dtype=dtype), codes, scales, group_size, kt.MODE_GRAD_INPUT, k)
    codes, scales, _ = kt.quantize_weight(randn(n, k), k)
    kt.ternary_mm(randn(16, k), codes, scales, k, kt.MODE_FORWARD, k, bias=randn(n))  # fp32, see above


def launch_quant() -> None:
    """QAT codes (absmax or given clip) and GEMMs, per row and per group; fp8 e4m3 / e5m2 per row and per tensor."""
    m, k, n = 200, 384, 320
    for dtype in FLOATS:
        x, w, bias = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype), randn(n)
        for group_size in (k, 64):
            codes, scales, _ = kq.quantize_codes(w, 31, group_size, dequant_dtype=dtype)
            kq.quantize_codes(w, 127, group_size, clip=scales)
            if dtype == torch.bfloat16:
                kq.qat_matmul(x, codes, scales, group_size, bias=bias)
                kq.qat_matmul(randn(m, n, dtype=dtype), codes, scales, group_size, weight_rows_are_n=False)
        for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
            for rowwise in (True, False):
                kq.fp8_quantize(x, fp8, rowwise)
        # as tgolf.ops.quant calls it: forward e4m3 x @ e4m3 wᵀ; fp8 backward e5m2 grad (one scale) @ e4m3 w
        xq, sx = kq.fp8_quantize(x, torch.float8_e4m3fn, True)
        wq, sw = kq.fp8_quantize(w, torch.float8_e4m3fn, True)
        kq.fp8_matmul(xq, sx, wq.T, sw, dtype, bias=bias)
        gq, sg = kq.fp8_quantize(randn(m, n, dtype=dtype), torch.float8_e5m2, False)
        kq.fp8_matmul(gq, sg, wq, torch.ones(()), dtype)
    codes, scales, _ = kq.quantize_codes(randn(n, k), 31, k)
    kq.qat_matmul(randn(m, k), codes, scales, k, bias=randn(n))  # fp32, see above


def launch_mlp() -> None:
    """The fused squared-activation GEMM, forward and backward, with every autotune config: bf16 only (its dots
    are tf32 for fp32 inputs, no separate branch)."""
    m, dim, hidden, bf16 = 256, 512, 1024, torch.bfloat16
    _, h = km.gemm_sq_act(randn(m, dim, dtype=bf16), randn(hidden, dim, dtype=bf16), 0.5)
    km.gemm_sq_act_grad(randn(m, dim, dtype=bf16), randn(dim, hidden, dtype=bf16), h, 0.5)


def launch_loss() -> None:
    """Vocabularies of one block (1024, 8192) and several (16384), with and without the softcap."""
    for dtype in FLOATS:
        for vocab in (1024, 8192, 16384):
            for softcap in (30.0, 0.0):
                kl.softcap_ce_chunk(randn(8, vocab, dtype=dtype), torch.zeros(8, dtype=torch.long), softcap, 1.0)


def launch_linear_attention() -> None:
    """Chunked forward / backward and the recurrent form, GQA (2 query heads per kv head): bf16 with head dims 64
    and 128, with and without decay and initial state, the state passes whole and in segments of 2 chunks; fp32
    (see above) once, at the smallest chunk."""
    from tgolf.ops.linear_attention import _chunk_table, _uniform_tables

    seqs, seq_len, heads, kv_heads, scale = 2, 256, 4, 2, 0.125
    total = seqs * seq_len
    for dtype, dk, chunk, with_state in ((torch.bfloat16, 64, 64, True), (torch.bfloat16, 64, 64, False),
                                         (torch.bfloat16, 128, 64, True), (torch.bfloat16, 128, 64, False),
                                         (torch.float32, 64, 16, True)):
        cu, coff, ctab = _uniform_tables(seqs, seq_len, chunk, torch.device("cpu"))
        chunks = ctab.shape[0]
        q, k = randn(total, heads, dk, dtype=dtype), randn(total, kv_heads, dk, dtype=dtype)
        v, do = randn(total, kv_heads, dk, dtype=dtype), randn(total, heads, dk, dtype=dtype)
        g = -torch.rand(total, heads) if with_state else None
        h0 = randn(seqs, heads, dk, dk) if with_state else None
        for segments in (None, (2, *_chunk_table(cu, 2 * chunk, chunks // 2 + seqs))):
            h, ht = kla.chunk_states(k, v, g, h0, cu, coff, chunks, heads, chunk, False, segments)
            dht = ht if with_state else None
            dh, _ = kla.chunk_state_grads(q, do, g, dht, cu, coff, chunks, scale, chunk, False, segments)
        kla.chunk_output(q, k, v, g, h, cu, ctab, scale, chunk, False)
        kla.chunk_grads(q, k, v, g, h, do, dh, cu, ctab, scale, chunk, False)
        kla.recurrent_forward(q, k, v, g, h0, cu, scale)


FAMILIES: tuple[Callable[[], None], ...] = (launch_ternary, launch_quant, launch_mlp, launch_loss,
                                            launch_linear_attention)


# ------------------------------------------------------------------------------------------------ compiling

def specialise(backend: Any, jit: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` derives them at launch (the same
    private helpers in Triton 3.6 to 3.9), so the compiled variant is the one a GPU launch would compile."""
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def describe(signature: dict, constexprs: dict, options: dict) -> dict:
    """JSON-able facts the test checks: argument types, constexpr values (by name), warps and stages."""
    names = list(signature)
    return dict(signature={k: v for k, v in signature.items() if v != "constexpr"},
                constexprs={names[path[0]]: str(value) for path, value in constexprs.items()},
                num_warps=options["num_warps"], num_stages=options["num_stages"])


def compile_all(launches: list[Launch]) -> list[dict]:
    """One result per distinct launch: its description, compile seconds, PTX facts or the compiler's error."""
    backend = make_backend(TARGET)
    seen: set[str] = set()
    results = []
    for jit, args, kwargs in launches:
        signature, constexprs, attrs, options = specialise(backend, jit, args, kwargs)
        key = repr((id(jit), signature, sorted(constexprs.items()), sorted(attrs.items()), sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        result = dict(kernel=jit.__name__, **describe(signature, constexprs, options))
        start = time.perf_counter()
        try:
            source = ASTSource(jit, signature, constexprs, attrs)
            with redirect_stdout(io.StringIO()) as ptxas_log:
                compiled = triton.compile(source, target=TARGET, options=options)
            ptx = compiled.asm["ptx"]
            result.update(wgmma="wgmma" in ptx, cp_async="cp.async" in ptx, f64_div="div.rn.f64" in ptx,
                          shared_bytes=compiled.metadata.shared, **ptxas_usage(ptxas_log.getvalue()))
        except Exception as error:  # reported per launch, so one failure does not hide the others
            result["error"] = f"{type(error).__name__}: {error}"[-3000:]
        result["seconds"] = round(time.perf_counter() - start, 2)
        results.append(result)
    return results


def ptxas_usage(log: str) -> dict:
    """Registers per thread and spill bytes from ``ptxas -v`` (printed by Triton with dump_ptxas_log; empty when
    the kernel came from Triton's cache, which is why main() compiles into a fresh cache)."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(regs[1]) if regs else None,
                spill_bytes=int(spills[1]) + int(spills[2]) if spills else None)


def _function(jit: JITFunction | Autotuner) -> FunctionType:
    while not isinstance(jit, FunctionType):
        jit = jit.fn
    return jit


def uncovered(launched: list[JITFunction]) -> list[str]:
    """@triton.jit functions and autotuners of the kernels package that no recorded launch compiles: neither
    launched nor called, directly or not, from a launched kernel. Calls are followed by global name, so a helper
    reached as ``module.helper`` shows up here (a false alarm, never a silent escape). An autotuner counts as
    launched with its kernel (recording() records the kernel once per config)."""
    reached: set[int] = set()
    todo = list(launched)
    while todo:
        jit = todo.pop()
        if id(jit) not in reached:
            reached.add(id(jit))
            fn = _function(jit)
            todo += [v for name in fn.__code__.co_names if isinstance(v := fn.__globals__.get(name), JITFunction)]
    missing = []
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"{kernels_pkg.__name__}.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, (JITFunction, Autotuner)) and _function(value).__module__ == module.__name__:
                kernel = value.fn if isinstance(value, Autotuner) else value
                if id(kernel) not in reached:
                    missing.append(f"{info.name}.{attr}")
    return sorted(missing)


def main() -> None:
    with recording() as launches:
        for family in FAMILIES:
            family()
    knobs.nvidia.dump_ptxas_log = True
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir = cache  # every launch really runs ptxas, so its resource report is there to read
        results = compile_all(launches)
    print(json.dumps(dict(triton=triton.__version__, launches=results,
                          uncovered=uncovered([jit for jit, _, _ in launches]))))


if __name__ == "__main__":
    main()
