"""Every Triton kernel compiles for sm_90 (H100) as its launch helpers launch it, without a GPU.

The CPU interpreter (TRITON_INTERPRET=1) runs the kernels but never compiles them, so compile-only errors (tl.dot
dtype rules, layouts, ptxas) and lost Hopper paths (wgmma, cp.async pipelining) only show here.
tests/_sm90_launches.py records the launches of all five families' helpers and compiles each distinct one in a
child process without TRITON_INTERPRET; these tests check what it reports.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tgolf.kernels.mlp import _GPU_CONFIGS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The tensor-core GEMMs: bf16 / int8 / fp8 operands must reach wgmma on sm_90 (exact fp32 dots cannot).
WGMMA_GEMMS = ("_ternary_mm_kernel", "_int8_mm_kernel", "_qat_matmul_kernel", "_fp8_matmul_kernel",
               "_gemm_sq_act_kernel")
# H100's shared memory per block (opt-in maximum, 227 KiB): a launch over it fails with OutOfResources on the GPU.
H100_SHARED_BYTES = 232_448
# Spill bytes (stores + loads per thread) tolerated in a hot launch: a few registers' worth, not a tile.
SPILL_TOLERANCE = 128
LINEAR_ATTENTION_CHUNK = ("chunk_state_kernel", "chunk_out_fwd_kernel", "chunk_bwd_kernel")


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "tests/_sm90_launches.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.splitlines()[-1])


def launches(report: dict, kernel: str) -> list[dict]:
    found = [launch for launch in report["launches"] if launch["kernel"] == kernel]
    assert found, f"{kernel}: never launched"
    return found


def label(launch: dict) -> str:
    """The launch's kernel, operand types and constexprs (unit strides and the like left out), for messages."""
    consts = {k: v for k, v in launch["constexprs"].items() if k.isupper()}
    return f"{launch['kernel']} {list(launch['signature'].values())[:2]} {consts} warps={launch['num_warps']}"


def test_every_recorded_launch_compiles_for_sm90(report):
    failed = [f"{label(launch)}\n    {launch['error']}" for launch in report["launches"] if "error" in launch]
    assert not failed, f"triton {report['triton']}: " + "\n".join(failed)


def test_every_triton_kernel_in_kernels_is_launched(report):
    """A @triton.jit function nothing launches (or calls from a launched kernel) would escape the compile check:
    add its launch helper's calls to tests/_sm90_launches.py."""
    assert report["uncovered"] == []


def test_every_launch_fits_h100_shared_memory(report):
    over = [f"{label(launch)}: {launch['shared_bytes']} bytes" for launch in report["launches"]
            if launch["shared_bytes"] > H100_SHARED_BYTES]
    assert not over, f"over {H100_SHARED_BYTES} bytes of shared memory:\n" + "\n".join(over)


def is_hot(launch: dict) -> bool:
    """A launch of the bf16 / int8 / fp8 training path, not of the fp32 correctness path (exact ieee dots)."""
    first_operand = next(iter(launch["signature"].values()))
    return first_operand != "*fp32" and "ieee" not in (launch["constexprs"].get("PRECISION"),
                                                       launch["constexprs"].get("PREC"))


def test_hot_launches_do_not_spill_registers(report):
    """ptxas's spill report (read from a fresh Triton cache): a launch helper's fixed tile must not spill; an
    autotuned kernel may have configs that do (the autotuner times them) but not all of them, in each direction."""
    launched = report["launches"]
    assert all(launch["spill_bytes"] is not None for launch in launched), "ptxas -v log not captured"
    autotuned = {"_gemm_sq_act_kernel"}
    fixed = [f"{label(launch)}: {launch['spill_bytes']} bytes" for launch in launched
             if is_hot(launch) and launch["kernel"] not in autotuned and launch["spill_bytes"] > SPILL_TOLERANCE]
    assert not fixed, "\n".join(fixed)
    for kernel in autotuned:
        for backward in ("False", "True"):
            configs = [launch for launch in launches(report, kernel) if launch["constexprs"]["BACKWARD"] == backward]
            assert any(launch["spill_bytes"] == 0 for launch in configs), f"{kernel} BACKWARD={backward}"


def test_hot_gemms_use_wgmma_on_sm90(report):
    """Large-tile GEMMs on bf16 / int8 / fp8 operands use Hopper's wgmma; the small-batch ternary tile (BLOCK_M 16)
    is too small for it and exact fp32 (PRECISION "ieee") has no tensor-core path."""
    hot = [launch for kernel in WGMMA_GEMMS for launch in launches(report, kernel)
           if launch["constexprs"].get("PRECISION") != "ieee" and int(launch["constexprs"]["BLOCK_M"]) >= 64]
    assert {launch["kernel"] for launch in hot} == set(WGMMA_GEMMS)
    assert [label(launch) for launch in hot if not launch["wgmma"]] == []


def test_linear_attention_chunk_kernels_use_wgmma_on_bf16(report):
    """The chunked form's intra-chunk and state products are tensor-core work: on bf16 they reach wgmma."""
    bf16 = [launch for kernel in LINEAR_ATTENTION_CHUNK for launch in launches(report, kernel)
            if launch["constexprs"].get("DOT_DTYPE") == "bf16"]
    assert {launch["kernel"] for launch in bf16} == set(LINEAR_ATTENTION_CHUNK)
    assert [label(launch) for launch in bf16 if not launch["wgmma"]] == []


def test_mlp_gemm_is_pipelined_with_cp_async_in_every_autotune_config(report):
    mlp = launches(report, "_gemm_sq_act_kernel")
    configs = {(launch["constexprs"]["BACKWARD"], launch["constexprs"]["BLOCK_M"], launch["constexprs"]["BLOCK_N"],
                launch["constexprs"]["BLOCK_K"], launch["num_warps"], launch["num_stages"]) for launch in mlp}
    assert len(configs) == 2 * len(_GPU_CONFIGS), "every autotune config, forward and backward"
    assert [label(launch) for launch in mlp if not launch["cp_async"]] == []


def test_int8_activation_quantization_divides_in_float64(report):
    """127 / absmax must be a correctly rounded float64 division to match the reference's codes bit for bit."""
    assert all(launch["f64_div"] for launch in launches(report, "_act_quant_kernel"))
